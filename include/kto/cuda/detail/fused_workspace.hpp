// cuda/detail/fused_workspace.hpp — the workspace layout of a fused-linear call.
//
// One chunk of rows is the unit of memory: its fp32 logits Z_c (ld_logits apart),
// their gradient dZ_c in the input type (ld_grad apart; fp32 reuses the logits),
// and its hidden rows H_c gathered contiguous. As many rows as config.chunk_bytes
// holds, never more than the batch. Beside it: the step's batch scratch
// (step.hpp), row scales g_s c_r, an fp32 bias, ones for the db GEMV (only when
// db is asked for), compact scoring's row maps, vocab parallel's row partials, and
// the cuBLAS workspace. The same Carver order answers the size query and lays the
// buffers out. dW needs no workspace: its GEMM writes the caller's d_weight (fp32
// sums across chunks there), so a frozen head (no dW) saves that array, not scratch.
#pragma once

#include <cuda_fp16.h>
#include <library_types.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../fused_linear_types.hpp"

namespace kto {
namespace cuda {
namespace detail {

template <class T>
constexpr cudaDataType_t cuda_data_type() {
  return std::is_same<T, float>::value    ? CUDA_R_32F
         : std::is_same<T, __half>::value ? CUDA_R_16F
                                          : CUDA_R_16BF;
}

inline index_t round_up(index_t x, index_t m) {
  return (x + m - 1) / m * m;
}

template <class T>
MatrixView<T> typed(const MatrixView<void>& m) {
  return MatrixView<T>{static_cast<T*>(m.data), m.rows, m.cols, m.stride};
}

/// Chunk geometry: fp32 logits rows `ld_logits` apart, their gradient (T) `ld_grad` apart.
template <class T>
struct ChunkShape {
  index_t rows, ld_logits, ld_grad;
  /// `max_rows`: the most rows a call walks (no chunk larger than the batch).
  ChunkShape(index_t vocab, size_t budget, index_t max_rows) {
    ld_logits = round_up(vocab, 4);
    ld_grad = std::is_same<T, float>::value ? ld_logits : round_up(vocab, 8);
    const size_t per_row = sizeof(float) * static_cast<size_t>(ld_logits) +
                           (std::is_same<T, float>::value ? 0 : sizeof(T) * ld_grad);
    rows = chunk_rows_for_budget(budget, per_row, max_rows);
  }
};

/// Strategy vocab_blocks' backward: every chunked row at once, `cols` vocabulary
/// columns a block (a multiple of kMinCols, also the leading dimension of the
/// block's logits and gradient), as many as `elements` of the chunk hold.
struct VocabBlockShape {
  static constexpr index_t kMinCols = 64;
  index_t cols;
  VocabBlockShape(index_t vocab, size_t elements, index_t rows) {
    const index_t fit =
        rows > 0 ? static_cast<index_t>(elements / static_cast<size_t>(rows)) / kMinCols * kMinCols
                 : kMinCols;
    cols = std::min(std::max(fit, kMinCols), round_up(vocab, kMinCols));
  }
};

/// Compact scoring's host plan of one batch: its sequences' offsets among the
/// scored rows (B + 1 entries, last = the scored row count). Off (`on` false)
/// without host targets and offsets.
struct CompactPlan {
  bool on = false;
  std::vector<index_t> offsets;
  index_t rows() const { return on ? offsets.back() : 0; }
  SequencesView sequences() const {
    return SequencesView{offsets.data(), static_cast<index_t>(offsets.size()) - 1};
  }
};

/// From host copies of a batch's targets (`layout` as its device targets) and offsets
/// (already validated against the rows): row r is scored when it lies in a sequence and
/// its target is not ignore_index, as on the device.
inline CompactPlan compact_plan(const index_t* host_targets, const RowIndex& layout,
                                const index_t* host_offsets, index_t count, index_t ignore) {
  CompactPlan plan;
  if (host_targets == nullptr || host_offsets == nullptr) return plan;
  plan.on = true;
  plan.offsets.assign(static_cast<size_t>(count + 1), 0);
  const TargetsView targets{host_targets, layout};
  index_t n = 0;
  for (index_t s = 0; s < count; ++s) {
    for (index_t r = host_offsets[s]; r < host_offsets[s + 1]; ++r) n += targets.at(r) != ignore;
    plan.offsets[static_cast<size_t>(s + 1)] = n;
  }
  return plan;
}

/// The batch scratch of a step plus the fused step's own: row scales, the fp32
/// bias, the ones of the db product (without db: none), one chunk (logits, their
/// gradient, hidden rows, and with compact scoring its dH rows) and the cuBLAS
/// workspace; with compact scoring, each batch's map from compact to batch rows.
struct FusedBuffers : BatchBuffers {
  float* row_scale;
  float* bias;
  void* ones;          ///< T, ones_count of them; null without db
  index_t ones_count;  ///< the most rows one db product sums (0 without db)
  float* logits;
  void* grad;
  size_t chunk_elements;        ///< logits (fp32) and gradient (T) elements the chunk holds
  void* hidden;                 ///< the chunk's hidden rows, ignored rows zeroed (T, cols apart)
  float* d_hidden;              ///< compact scoring: the chunk's dH rows before their scatter
  index_t *row_of, *kl_row_of;  ///< compact scoring: the scored rows of each batch
  /// Vocab parallel: this rank's row partials (KL rows, then target rows) and all ranks'.
  RowPartial<float>*partials, *gathered;
  void* cublas;
};

/// What the fused scratch is carved for: the batches' rows and examples, which batch
/// scores compact rows, whether the backward runs (its dH rows for compact scoring)
/// and whether it computes db (the ones of its GEMV).
struct FusedLayout {
  index_t rows = 0, sequences = 0, kl_rows = 0, kl_sequences = 0;
  bool compact = false, kl_compact = false, backward = true;
  /// db is asked for (outputs.d_bias given). dW takes no workspace either way.
  bool bias_grad = true;
  /// Strategy vocab_blocks: the backward holds every row's hidden states (and with
  /// compact scoring, their dH), a block of logits at least kMinCols wide over them.
  bool vocab_blocks = false;
  /// Vocab parallel: the slices whose row partials the step gathers (0: not sharded, or
  /// the partials gathered ahead by the caller).
  index_t ranks = 0;

  /// A step's: compact scoring where host targets and offsets are given; db where
  /// outputs.d_bias is.
  template <class T>
  static FusedLayout of(const FusedLinearArguments<T>& a) {
    const FusedLinearInputs<T>& in = a.inputs;
    const RowPartialsAllGather& gather = a.hooks.gather_partials;
    FusedLayout l;
    l.vocab_blocks = a.config.strategy == FusedStrategy::vocab_blocks;
    // can_implement checks the range; clamped here for a query made before it.
    // Partials gathered ahead (gather.gathered) need no room of the step's.
    l.ranks = gather.gather ? std::min(std::max<index_t>(gather.ranks, 1), kMaxVocabRanks) : 0;
    l.rows = in.hidden.rows;
    l.sequences = in.sequences.count;
    l.kl_rows = in.kl.hidden.rows;
    l.kl_sequences = in.kl.sequences.count;
    l.compact = in.host_targets != nullptr && in.host_offsets != nullptr;
    l.kl_compact = in.kl.host_targets != nullptr && in.kl.host_offsets != nullptr;
    l.bias_grad = a.outputs.wants_bias();
    return l;
  }
  /// fused_linear_logprobs': one batch, forward only.
  static FusedLayout forward_only(index_t rows, bool compact) {
    FusedLayout l;
    l.rows = rows;
    l.compact = compact;
    l.backward = false;
    l.bias_grad = false;
    return l;
  }
};

template <class T>
FusedBuffers carve_fused(Carver& c, const FusedLayout& l, const LinearHead<T>& head,
                         const FusedLinearConfig& cfg) {
  const index_t N = l.rows, NK = l.kl_rows, D = head.weight.cols;
  const ChunkShape<T> shape(head.weight.rows, cfg.chunk_bytes, std::max(N, NK));
  const bool blocks = l.vocab_blocks && l.backward;
  const index_t rows = blocks ? std::max(shape.rows, N) : shape.rows;  // hidden rows at once
  const size_t elements = std::max(static_cast<size_t>(shape.rows * shape.ld_logits),
                                   blocks ? static_cast<size_t>(N * VocabBlockShape::kMinCols) : 0);
  FusedBuffers b;
  static_cast<BatchBuffers&>(b) = BatchBuffers::carve(c, N, l.sequences, NK, l.kl_sequences);
  b.row_of = l.compact ? c.take<index_t>(N) : nullptr;
  b.kl_row_of = l.kl_compact ? c.take<index_t>(NK) : nullptr;
  const index_t partial_rows = std::max<index_t>(NK, 0) + N;  // the most a gather sends
  b.partials = l.ranks ? c.take<RowPartial<float>>(partial_rows) : nullptr;
  b.gathered = l.ranks ? c.take<RowPartial<float>>(l.ranks * partial_rows) : nullptr;
  b.d_hidden = l.compact && l.backward ? c.take<float>(rows * D) : nullptr;
  b.row_scale = c.take<float>(N);
  b.bias = head.bias.size ? c.take<float>(head.weight.rows) : nullptr;
  const bool ones = l.backward && l.bias_grad;  // the db GEMV's operand
  b.ones_count = ones ? rows : 0;
  b.ones = ones ? c.take<T>(rows) : nullptr;
  b.chunk_elements = elements;
  b.logits = c.take<float>(static_cast<index_t>(elements));
  // The gradient's rows are ld_grad >= ld_logits apart: as many rows as the logits.
  const size_t grad_elements = std::max(static_cast<size_t>(shape.rows * shape.ld_grad), elements);
  b.grad = std::is_same<T, float>::value
               ? static_cast<void*>(b.logits)
               : static_cast<void*>(c.take<T>(static_cast<index_t>(grad_elements)));
  b.hidden = c.take<T>(rows * D);
  b.cublas = c.take<char>(static_cast<index_t>(cfg.cublas_workspace_bytes));
  return b;
}

/// Bytes of carve_fused()'s layout.
template <class T>
size_t fused_workspace_bytes(const FusedLayout& l, const LinearHead<T>& head,
                             const FusedLinearConfig& cfg) {
  Carver c(nullptr);
  carve_fused(c, l, head, cfg);
  return c.used();
}

}  // namespace detail
}  // namespace cuda
}  // namespace kto
