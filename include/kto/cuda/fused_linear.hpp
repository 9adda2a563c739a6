// cuda/fused_linear.hpp — the fused-linear KTO step on a CUDA stream.
//
// cuBLAS GEMMs (bf16/half in, fp32 accumulate and out) around the row kernels
// of fused_linear_kernels.cuh; see ../fused_linear.hpp for the order of work:
//
//   per chunk   H_c                     gather_scored_rows_kernel (ignored rows as zeros)
//               Z_c = H_c Wᵀ            cublasGemmEx, fp32 logits (bias added by the kernels)
//               lse_r, ℓ_r              chunk_forward_kernel
//               logp_s, g_s, c_r g_s    sequence_logp_kernel, sequence_grad_kernel
//               dZ_c                    chunk_backward_kernel, in the input type
//               dH_c = dZ_c W           cublasGemmEx, fp32 out
//               dW += dZ_cᵀ H_c         cublasGemmEx, fp32 accumulate across chunks
//               db += dZ_cᵀ 1           cublasGemmEx (a GEMV against ones)
//
// keep_chunk needs the offsets on the host too (`host_offsets`) to pack whole
// sequences into chunks; without them, or with strategy recompute, the step
// runs forward over every chunk, then recomputes Z_c for the backward.
// Conventions are step.hpp's: device pointers, no allocation, no sync,
// stream-ordered and graph-capturable (the chunk loop is fixed by the host
// offsets and sizes), workspace query then call, device errors via
// read_status(). The cuBLAS handle is set to `stream` and to a slice of the
// workspace. Extra memory: one chunk (config.chunk_bytes), its hidden rows
// (chunk rows × D in the input type) + O(rows) floats. Ignored rows enter the
// GEMMs as zeros, so a NaN there never reaches a gradient.
// Vocab-parallel (head.weight a vocabulary slice, RowPartialsAllGather set): as on
// the CPU, each rank's row partials of both batches go out in one all-gather, the
// ranks are merged in rank order (the same lse on every rank), the backward needs
// no more communication; dH is a partial sum for the caller to all-reduce.
#pragma once

#include <cublas_v2.h>

#include <functional>

#include <kto/device/fused_linear_kernels.cuh>

#include "../fused_linear.hpp"
#include "step.hpp"

namespace kto {
namespace cuda {

using kto::FusedStrategy;

struct FusedLinearConfig {
  /// Budget for one chunk: fp32 logits plus their gradient in the input type.
  size_t chunk_bytes = kDefaultCudaChunkBytes;
  FusedStrategy strategy = FusedStrategy::keep_chunk;
  /// Handed to cuBLAS (cublasSetWorkspace), carved from the workspace.
  size_t cublas_workspace_bytes = size_t{32} << 20;
};

template <class T>
struct FusedLinearInputs {
  MatrixView<const T> hidden;  ///< N × D, policy model, target batch (device)
  TargetsView targets;
  SequencesView sequences;                ///< device offsets
  const index_t* host_offsets = nullptr;  ///< the same offsets in host memory (keep_chunk)
  /// targets.data's values in host memory, the same layout; with host_offsets the
  /// GEMMs multiply only the scored rows (compact scoring: prompt and padding rows
  /// cost nothing). Checked on the device against targets: read_status reports a
  /// chunk plan the device's scored rows do not fit (their count, or with keep_chunk
  /// a row outside its chunk's sequences); a plan they fit gives the right result.
  const index_t* host_targets = nullptr;
  ReferenceLogp<float> reference_logp;  ///< B, kto::reference_logp(device pointer, B)
  const std::uint8_t* desirable = nullptr;
  struct Kl {
    MatrixView<const T> hidden;  ///< forward only
    TargetsView targets;
    SequencesView sequences;
    ReferenceLogp<float> reference_logp;
    const index_t* host_offsets = nullptr;  ///< with host_targets: compact scoring, as above
    const index_t* host_targets = nullptr;
  } kl;
};

/// Device outputs: the logits step's (metrics required, a null per-example
/// array stays in the workspace) plus the gradients, written (not accumulated)
/// in fp32. d_hidden is required, and one of d_weight and d_weight_in_input_type;
/// d_bias is empty (skipped) or head.weight.rows entries.
struct FusedLinearOutputs : StepOutputs {
  MatrixView<float> d_hidden;
  MatrixView<float> d_weight;
  /// dW in the step's input type T instead of fp32 (d_weight then empty), with
  /// strategy vocab_blocks only: each block is summed over every row in fp32 inside
  /// one GEMM and rounded once, so no V × D fp32 array exists (half of fp32's bytes).
  MatrixView<void> d_weight_in_input_type;
  Span<float> d_bias;
};

/// The most vocabulary slices a step gathers (the workspace holds ranks × rows partials).
constexpr index_t kMaxVocabRanks = index_t{1} << 16;

/// Vocab parallel: all-gathers this rank's row partials (`local`, device, `rows` of them)
/// into `gathered` (device, ranks × rows, rank-major: rank k's row r at k·rows + r) on
/// `stream`, e.g. ncclAllGather. Called once a step, for the KL batch's rows and then the
/// target batch's together; `ranks` is the number of vocabulary slices.
struct RowPartialsAllGather {
  index_t ranks = 0;  ///< in [2, min(head.vocab_total, kMaxVocabRanks)]
  std::function<Status(const RowPartial<float>* local, RowPartial<float>* gathered, index_t rows,
                       cudaStream_t stream)>
      gather;
  explicit operator bool() const { return static_cast<bool>(gather); }
};

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

/// Batch rows [first, last): by default every row.
struct RowRange {
  index_t first = 0;
  index_t last = device::ChunkView::kAnyRow;
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
/// bias, the ones of the db product, one chunk (logits, their gradient, hidden
/// rows, and with compact scoring its dH rows) and the cuBLAS workspace; with
/// compact scoring, each batch's map from compact to batch rows.
struct FusedBuffers : BatchBuffers {
  float* row_scale;
  float* bias;
  void* ones;
  index_t ones_count;  ///< the most rows one db product sums
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
/// scores compact rows, and whether the backward runs (its dH rows for compact scoring).
struct FusedLayout {
  index_t rows = 0, sequences = 0, kl_rows = 0, kl_sequences = 0;
  bool compact = false, kl_compact = false, backward = true;
  /// Strategy vocab_blocks: the backward holds every row's hidden states (and with
  /// compact scoring, their dH), a block of logits at least kMinCols wide over them.
  bool vocab_blocks = false;
  /// Vocab parallel: the slices whose row partials are gathered (0: not sharded).
  index_t ranks = 0;

  /// A step's: compact scoring where host targets and offsets are given.
  template <class T>
  static FusedLayout of(const FusedLinearInputs<T>& in, const FusedLinearConfig& cfg,
                        const RowPartialsAllGather& gather) {
    FusedLayout l;
    l.vocab_blocks = cfg.strategy == FusedStrategy::vocab_blocks;
    // can_implement checks the range; clamped here for a query made before it.
    l.ranks = gather ? std::min(std::max<index_t>(gather.ranks, 1), kMaxVocabRanks) : 0;
    l.rows = in.hidden.rows;
    l.sequences = in.sequences.count;
    l.kl_rows = in.kl.hidden.rows;
    l.kl_sequences = in.kl.sequences.count;
    l.compact = in.host_targets != nullptr && in.host_offsets != nullptr;
    l.kl_compact = in.kl.host_targets != nullptr && in.kl.host_offsets != nullptr;
    return l;
  }
  /// fused_linear_logprobs': one batch, forward only.
  static FusedLayout forward_only(index_t rows, bool compact) {
    FusedLayout l;
    l.rows = rows;
    l.compact = compact;
    l.backward = false;
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
  b.ones_count = rows;
  b.ones = c.take<T>(rows);
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

inline Status cublas_check(cublasStatus_t s, const char* fn, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return Status::success();
  return Status::make(StatusCode::cuda_error, "%s: cuBLAS %s failed with status %d", fn, what,
                      static_cast<int>(s));
}

/// Points the caller's cuBLAS handle at `stream` and at its slice of the workspace.
inline Status bind_cublas(cublasHandle_t handle, cudaStream_t stream, void* workspace, size_t bytes,
                          const char* fn) {
  Status s = cublas_check(cublasSetStream(handle, stream), fn, "set stream");
  if (s) s = cublas_check(cublasSetWorkspace(handle, workspace, bytes), fn, "set workspace");
  return s;
}

/// The GEMMs and row kernels of one head over chunks of a batch's rows.
template <class T>
class ChunkRunner {
 public:
  /// `extras`: the options' transform, applied to every batch, and the target
  /// batch's statistics buffers (forward_rows() says which batch it runs).
  ChunkRunner(cublasHandle_t handle, const LinearHead<T>& head, const FusedLinearConfig& cfg,
              index_t max_rows, const FusedBuffers& b, const RowExtras& extras, cudaStream_t stream,
              const char* fn)
      : handle_(handle),
        head_(head),
        shape_(head.weight.rows, cfg.chunk_bytes, max_rows),
        b_(b),
        extras_(extras),
        stream_(stream),
        fn_(fn) {}

  index_t chunk_rows() const { return shape_.rows; }

  /// Z_c = H_c Wᵀ in fp32 for chunk rows [r0, r0 + n): batch rows, or with a
  /// compact map (`row_of`) the r0-th to (r0 + n)-th scored rows; from the
  /// chunk's hidden rows with any ignored ones zeroed (kept for the dW product
  /// of backward()).
  Status logits(const MatrixView<const T>& hidden, const device::BatchRows& batch, index_t r0,
                index_t n, const index_t* row_of) {
    gather(hidden, batch, view(r0, n, row_of));
    return logits_gemm(0, head_.weight.rows, n, shape_.ld_logits);
  }

  /// Chunk rows [r0, r0 + n) of the logits buffer: the head's columns of the whole
  /// vocabulary (all of it, or a rank's slice). chunk_forward_kernel reads z.vocab
  /// columns: whole heads only (a slice's forward is partials_rows()).
  device::ChunkView view(index_t r0, index_t n, const index_t* row_of) const {
    return device::ChunkView{b_.logits, shape_.ld_logits, head_.total_vocab(), b_.bias, r0, n,
                             row_of};
  }

  /// The extras of the batch a tag names: the KL batch has no statistics.
  RowExtras extras_of(unsigned tag) const {
    return tag == device::kKlBatchTag ? extras_.without_statistics() : extras_;
  }

  void forward(const device::BatchRows& batch, index_t r0, index_t n, const index_t* row_of,
               float* row_lse, float* token_logp, unsigned tag, const RowRange& group) {
    const RowExtras e = extras_of(tag);
    device::ChunkView chunk = view(r0, n, row_of);
    chunk.group_first = group.first;
    chunk.group_last = group.last;
    device::ChunkForwardParams p{chunk, batch,       row_lse,       token_logp,      b_.errors,
                                 tag,   e.transform, e.row_entropy, e.row_mean_logit};
    launch_rows(head_.weight.rows, n, e.extended(),
                [&](auto threads, auto per_block, auto ext, dim3 grid, dim3 block) {
                  device::chunk_forward_kernel<decltype(threads)::value, decltype(per_block)::value,
                                               decltype(ext)::value>
                      <<<grid, block, 0, stream_>>>(p);
                });
  }

  /// Forward over chunk rows [first, last) of a batch (batch rows, or scored rows
  /// through `row_of`), chunk by chunk. `group`: the batch rows the host planned
  /// them over (compact scoring checks each mapped row falls inside).
  Status forward_rows(const MatrixView<const T>& hidden, const device::BatchRows& batch,
                      index_t first, index_t last, const index_t* row_of, float* row_lse,
                      float* token_logp, unsigned tag, const RowRange& group = {}) {
    for (index_t r0 = first; r0 < last; r0 += shape_.rows) {
      const index_t n = std::min(shape_.rows, last - r0);
      Status s = logits(hidden, batch, r0, n, row_of);
      if (!s) return s;
      forward(batch, r0, n, row_of, row_lse, token_logp, tag, group);
    }
    return last_launch(fn_);
  }

  /// Vocab parallel: this rank's row partials of chunk rows [first, last) of a batch
  /// (batch rows, or scored rows through `row_of`) into `partials` (batch rows).
  Status partials_rows(const MatrixView<const T>& hidden, const device::BatchRows& batch,
                       index_t first, index_t last, const index_t* row_of,
                       RowPartial<float>* partials, unsigned tag) {
    for (index_t r0 = first; r0 < last; r0 += shape_.rows) {
      const index_t n = std::min(shape_.rows, last - r0);
      Status s = logits(hidden, batch, r0, n, row_of);
      if (!s) return s;
      device::ChunkPartialsParams p{view(r0, n, row_of),
                                    head_.vocab_begin,
                                    head_.weight.rows,
                                    batch,
                                    partials,
                                    b_.errors,
                                    tag,
                                    extras_.transform};
      launch_rows(head_.weight.rows, n, extras_.transformed,
                  [&](auto threads, auto per_block, auto ext, dim3 grid, dim3 block) {
                    device::chunk_partials_kernel<decltype(threads)::value,
                                                  decltype(per_block)::value, decltype(ext)::value>
                        <<<grid, block, 0, stream_>>>(p);
                  });
    }
    return last_launch(fn_);
  }

  /// logp_s and n_s of sequences [first_seq, last_seq) from their rows' ℓ (and
  /// their token statistics, for the target batch when requested).
  void sequences(const device::BatchRows& batch, index_t first_seq, index_t last_seq, bool average,
                 const float* token_logp, float* logp, index_t* num_tokens, unsigned tag) const {
    const index_t count = last_seq - first_seq;
    if (count <= 0) return;
    const RowExtras e = extras_of(tag);
    const bool statistics = e.row_entropy != nullptr;
    device::SequenceParams sp{batch.targets,
                              SequencesView{batch.sequences.offsets + first_seq, count},
                              batch.rows,
                              batch.ignore_index,
                              average,
                              token_logp,
                              logp + first_seq,
                              num_tokens + first_seq,
                              e.row_entropy,
                              e.row_mean_logit,
                              statistics ? e.statistics.entropy_sum + first_seq : nullptr,
                              statistics ? e.statistics.mean_logit_sum + first_seq : nullptr};
    device::sequence_logp_kernel<<<static_cast<unsigned>((count + 7) / 8), 256, 0, stream_>>>(sp);
  }

  /// dZ_c from the chunk's logits, then dH_c, dW and db (dW from the hidden
  /// rows the last logits() call gathered: the same chunk). With a compact map,
  /// dH_c goes to the workspace first, then to its batch rows of out.d_hidden.
  Status backward(const device::BatchRows& batch, index_t r0, index_t n, const index_t* row_of,
                  const FusedLinearOutputs& out, bool first_chunk) {
    const device::ChunkView chunk = view(r0, n, row_of);
    Status s = logit_gradients(chunk, batch, shape_.ld_grad, 0, head_.weight.rows);
    if (!s) return s;
    const index_t D = head_.weight.cols;
    Products p;
    p.dh = row_of ? b_.d_hidden : out.d_hidden.row(r0);
    p.lddh = row_of ? D : out.d_hidden.stride;
    p.dw = out.d_weight.data;
    p.lddw = out.d_weight.stride;
    p.db = out.d_bias.size ? out.d_bias.data : nullptr;
    p.beta_w = first_chunk ? 0.0f : 1.0f;  // dW and db sum over the chunks
    s = products(0, head_.weight.rows, n, shape_.ld_grad, p);
    if (s && row_of) s = scatter_d_hidden(chunk, out);
    return s;
  }

  /// Strategy vocab_blocks: the backward over chunk rows [0, rows) at once (batch rows,
  /// or scored rows through `row_of`), block by block of vocabulary columns:
  /// Z_b = H W_bᵀ, dZ_b, dH (+)= dZ_b W_b, dW_b = dZ_bᵀ H in the output's type, db_b.
  /// Each dW and db entry is one GEMM's fp32 sum over every row, stored once.
  Status backward_blocks(const MatrixView<const T>& hidden, const device::BatchRows& batch,
                         index_t rows, const index_t* row_of, const FusedLinearOutputs& out) {
    const index_t V = head_.weight.rows, D = head_.weight.cols;
    const VocabBlockShape blocks(V, b_.chunk_elements, rows);
    const device::ChunkView all = view(0, rows, row_of);
    gather(hidden, batch, all);
    const bool typed_dw = out.d_weight_in_input_type.data != nullptr;
    Products p;
    p.dh = row_of ? b_.d_hidden : out.d_hidden.data;
    p.lddh = row_of ? D : out.d_hidden.stride;
    p.dw_type = typed_dw ? cuda_data_type<T>() : CUDA_R_32F;
    p.lddw = typed_dw ? out.d_weight_in_input_type.stride : out.d_weight.stride;
    for (index_t v0 = 0; v0 < V; v0 += blocks.cols) {
      const index_t w = std::min(blocks.cols, V - v0);
      Status s = logits_gemm(v0, w, rows, blocks.cols);
      if (!s) return s;
      device::ChunkView z = all;
      z.ld = blocks.cols;
      z.bias = b_.bias ? b_.bias + v0 : nullptr;
      s = logit_gradients(z, batch, blocks.cols, v0, w);
      if (!s) return s;
      p.dw = typed_dw ? static_cast<void*>(typed<T>(out.d_weight_in_input_type).row(v0))
                      : static_cast<void*>(out.d_weight.row(v0));
      p.db = out.d_bias.size ? out.d_bias.data + v0 : nullptr;
      p.beta_h = v0 == 0 ? 0.0f : 1.0f;  // dH sums over the blocks
      s = products(v0, w, rows, blocks.cols, p);
      if (!s) return s;
    }
    return row_of ? scatter_d_hidden(all, out) : Status::success();
  }

 private:
  /// Where the gradient products go: dH (fp32, beta_h), dW (dw_type, beta_w), db (fp32,
  /// beta_w; null: none), leading dimensions in elements.
  struct Products {
    float* dh = nullptr;
    index_t lddh = 0;
    float beta_h = 0.0f;
    void* dw = nullptr;
    cudaDataType_t dw_type = CUDA_R_32F;
    index_t lddw = 0;
    float beta_w = 0.0f;
    float* db = nullptr;
  };

  /// The chunk's hidden rows into b_.hidden: view.rows rows, D apart, unscored ones zero.
  void gather(const MatrixView<const T>& hidden, const device::BatchRows& batch,
              const device::ChunkView& view) {
    device::gather_scored_rows_kernel<T>
        <<<static_cast<unsigned>(std::min<index_t>(view.rows, 65535)), 128, 0, stream_>>>(
            hidden.data, hidden.stride, head_.weight.cols, batch, view, static_cast<T*>(b_.hidden));
  }

  /// b_.logits = the gathered rows' logits of vocabulary columns [v0, v0 + w), `ld` apart.
  Status logits_gemm(index_t v0, index_t w, index_t n, index_t ld) {
    const float one = 1.0f, zero = 0.0f;
    const cudaDataType_t t = cuda_data_type<T>();
    const int d = static_cast<int>(head_.weight.cols);
    return cublas_check(
        cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(w), static_cast<int>(n), d,
                     &one, head_.weight.row(v0), t, static_cast<int>(head_.weight.stride),
                     b_.hidden, t, d, &zero, b_.logits, CUDA_R_32F, static_cast<int>(ld),
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        fn_, "logits GEMM");
  }

  /// dZ into b_.grad (`ld_grad` apart) from the logits of `z`: columns [v0, v0 + w).
  Status logit_gradients(const device::ChunkView& z, const device::BatchRows& batch,
                         index_t ld_grad, index_t v0, index_t w) {
    // The one-hot's column: the head's first row is global column vocab_begin.
    device::ChunkBackwardParams<T> p{z,
                                     batch,
                                     b_.row_lse,
                                     b_.row_scale,
                                     static_cast<T*>(b_.grad),
                                     ld_grad,
                                     extras_.transform,
                                     head_.vocab_begin + v0,
                                     w};
    launch_rows(w, z.rows, extras_.transformed,
                [&](auto threads, auto per_block, auto ext, dim3 grid, dim3 block) {
                  device::chunk_backward_kernel<T, decltype(threads)::value,
                                                decltype(per_block)::value, decltype(ext)::value>
                      <<<grid, block, 0, stream_>>>(p);
                });
    return last_launch(fn_);
  }

  /// dH, dW and db from dZ (b_.grad, `n` rows of `w` columns from column v0, `ldg` apart)
  /// and the gathered hidden rows; fp32 sums inside each GEMM.
  Status products(index_t v0, index_t w, index_t n, index_t ldg, const Products& p) {
    const float one = 1.0f;
    const cudaDataType_t t = cuda_data_type<T>();
    const int d = static_cast<int>(head_.weight.cols), wi = static_cast<int>(w);
    const int ni = static_cast<int>(n), lg = static_cast<int>(ldg);
    Status s = cublas_check(
        cublasGemmEx(handle_, CUBLAS_OP_N, CUBLAS_OP_N, d, ni, wi, &one, head_.weight.row(v0), t,
                     static_cast<int>(head_.weight.stride), b_.grad, t, lg, &p.beta_h, p.dh,
                     CUDA_R_32F, static_cast<int>(p.lddh), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        fn_, "dH GEMM");
    if (!s) return s;
    s = cublas_check(
        cublasGemmEx(handle_, CUBLAS_OP_N, CUBLAS_OP_T, d, wi, ni, &one, b_.hidden, t, d, b_.grad,
                     t, lg, &p.beta_w, p.dw, p.dw_type, static_cast<int>(p.lddw),
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        fn_, "dW GEMM");
    if (!s || p.db == nullptr) return s;
    return cublas_check(
        cublasGemmEx(handle_, CUBLAS_OP_N, CUBLAS_OP_N, wi, 1, ni, &one, b_.grad, t, lg, b_.ones, t,
                     ni, &p.beta_w, p.db, CUDA_R_32F, wi, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        fn_, "db GEMM");
  }

  /// Compact scoring: the dH rows in b_.d_hidden to their batch rows of out.d_hidden.
  Status scatter_d_hidden(const device::ChunkView& chunk, const FusedLinearOutputs& out) {
    device::scatter_rows_kernel<<<static_cast<unsigned>(std::min<index_t>(chunk.rows, 65535)), 128,
                                  0, stream_>>>(b_.d_hidden, head_.weight.cols, chunk,
                                                out.d_hidden.data, out.d_hidden.stride);
    return last_launch(fn_);
  }

  cublasHandle_t handle_;
  const LinearHead<T>& head_;
  ChunkShape<T> shape_;
  FusedBuffers b_;
  RowExtras extras_;
  cudaStream_t stream_;
  const char* fn_;
};

/// Compact scoring plans its chunks from the host targets and the host offsets together.
inline void validate_compact(const index_t* host_targets, const index_t* host_offsets,
                             const char* fn, const std::string& prefix) {
  kto::detail::require(host_targets == nullptr || host_offsets != nullptr, fn,
                       prefix + "host_offsets",
                       "be given with " + prefix +
                           "host_targets (compact scoring plans its "
                           "chunks from both)",
                       "nullptr");
}

/// With compact scoring on, row_of = the batch's scored rows (compact_rows_kernel),
/// checked against the host plan's count.
inline void launch_compact_rows(const CompactPlan& plan, const device::BatchRows& batch,
                                index_t* row_of, device::DeviceErrors* errors, unsigned tag,
                                cudaStream_t stream) {
  if (!plan.on) return;
  device::compact_rows_kernel<<<1, device::kCompactThreads, 0, stream>>>(batch, row_of, plan.rows(),
                                                                         errors, tag);
}

template <class T>
void validate_hidden(const MatrixView<const T>& hidden, const TargetsView& targets,
                     const SequencesView& seqs, const LinearHead<T>& head, const char* fn,
                     const std::string& prefix, bool allow_empty) {
  kto::detail::validate_matrix(hidden, fn, prefix + "hidden");
  kto::detail::require(hidden.cols == head.weight.cols, fn, prefix + "hidden.cols",
                       "equal head.weight.cols (" + std::to_string(head.weight.cols) + ")",
                       hidden.cols);
  kto::detail::require(hidden.rows < (index_t{1} << 31), fn, prefix + "hidden.rows",
                       "be < 2^31 (cuBLAS int sizes)", hidden.rows);
  kto::detail::validate_targets(targets, hidden.rows, fn, prefix + "targets");
  kto::detail::require(seqs.count >= (allow_empty ? 0 : 1), fn, prefix + "sequences.count",
                       allow_empty ? "be >= 0" : "be >= 1 (an empty batch has no loss)",
                       seqs.count);
  kto::detail::require(seqs.offsets != nullptr, fn, prefix + "sequences.offsets",
                       "be non-null (count + 1 entries, device memory)", "nullptr");
}

/// A cuBLAS operand: its row stride is a leading dimension, >= cols and an int,
/// whatever the row count.
template <class T>
void validate_cublas_operand(const MatrixView<T>& m, const char* fn, const std::string& name) {
  kto::detail::require(
      m.stride >= m.cols && m.stride < (index_t{1} << 31), fn, name + ".stride",
      "be >= cols (" + std::to_string(m.cols) + ") and < 2^31: a cuBLAS leading dimension",
      m.stride);
}

template <class T>
void validate_cuda_head(const LinearHead<T>& head, const char* fn, bool slices) {
  kto::detail::validate_head(head, fn);
  validate_cublas_operand(head.weight, fn, "head.weight");
  kto::detail::require(slices || !head.sharded(), fn, "head.vocab_total",
                       "equal head.weight.rows (merge slices with fused_linear_kto_step)",
                       head.vocab_total);
  kto::detail::require(head.weight.rows < (index_t{1} << 31), fn, "head.weight.rows",
                       "be < 2^31 (cuBLAS int sizes)", head.weight.rows);
}

}  // namespace detail

/// Checks every host-visible argument of fused_linear_kto_step(); launches nothing.
template <class T>
Status can_implement(const FusedLinearInputs<T>& in, const LinearHead<T>& head, const Options& o,
                     const FusedLinearOutputs& out, const FusedLinearConfig& cfg = {},
                     const RowPartialsAllGather& gather_partials = {}) {
  detail::check_logit_type<T>();
  const char* fn = "kto::cuda::fused_linear_kto_step";
  try {
    validate_options(o, fn);
    detail::validate_cuda_head(head, fn, true);
    if (head.sharded()) {
      kto::detail::require(static_cast<bool>(gather_partials), fn, "gather_partials",
                           "be set when head.weight holds a vocabulary slice (" +
                               std::to_string(head.weight.rows) + " of " +
                               std::to_string(head.total_vocab()) + " rows)",
                           "an empty function");
      kto::detail::require(!o.token_statistics, fn, "options.token_statistics",
                           "be false with a vocabulary slice (the row partials carry no entropy)",
                           "true");
      kto::detail::require(cfg.strategy != FusedStrategy::vocab_blocks, fn, "config.strategy",
                           "be keep_chunk or recompute with a vocabulary slice (the slice's "
                           "backward runs as recompute's)",
                           "vocab_blocks (2)");
    }
    if (head.sharded())
      kto::detail::require(
          gather_partials.ranks >= 2 &&
              gather_partials.ranks <= std::min(head.total_vocab(), kMaxVocabRanks),
          fn, "gather_partials.ranks",
          "be in [2, min(head.vocab_total, 65536)] (the vocabulary slices "
          "gathered, this one among them)",
          gather_partials.ranks);
    else
      kto::detail::require(!gather_partials, fn, "gather_partials",
                           "be empty when head.weight holds the whole vocabulary (a gather "
                           "the step never calls would leave the other ranks waiting)",
                           "a function");
    detail::validate_hidden(in.hidden, in.targets, in.sequences, head, fn, "", false);
    detail::validate_device_logp(in.reference_logp, in.sequences.count, fn, "reference_logp");
    kto::detail::require(in.desirable != nullptr, fn, "desirable", "be non-null", "nullptr");
    if (in.host_offsets)
      kto::detail::validate_sequences(SequencesView{in.host_offsets, in.sequences.count},
                                      in.hidden.rows, fn, "host_offsets", false);
    detail::validate_compact(in.host_targets, in.host_offsets, fn, "");
    if (uses_kl_batch(o)) {
      detail::validate_hidden(in.kl.hidden, in.kl.targets, in.kl.sequences, head, fn, "kl.", true);
      detail::validate_device_logp(in.kl.reference_logp, in.kl.sequences.count, fn,
                                   "kl.reference_logp");
      if (in.kl.host_offsets)
        kto::detail::validate_sequences(SequencesView{in.kl.host_offsets, in.kl.sequences.count},
                                        in.kl.hidden.rows, fn, "kl.host_offsets", true);
      detail::validate_compact(in.kl.host_targets, in.kl.host_offsets, fn, "kl.");
    }
    kto::detail::require(out.metrics != nullptr, fn, "out.metrics", "be non-null", "nullptr");
    detail::validate_statistics(out.token_statistics, o, in.sequences.count, fn,
                                "out.token_statistics");
    kto::detail::validate_shape(out.d_hidden, in.hidden.rows, in.hidden.cols, fn, "out.d_hidden",
                                "hidden");
    const MatrixView<T> typed_dw = detail::typed<T>(out.d_weight_in_input_type);
    if (typed_dw.data == nullptr) {
      kto::detail::validate_shape(out.d_weight, head.weight.rows, head.weight.cols, fn,
                                  "out.d_weight", "head.weight");
      detail::validate_cublas_operand(out.d_weight, fn, "out.d_weight");
    } else {
      kto::detail::require(out.d_weight.data == nullptr, fn, "out.d_weight",
                           "be empty when out.d_weight_in_input_type is given (one dW output)",
                           "a pointer");
      kto::detail::require(cfg.strategy == FusedStrategy::vocab_blocks, fn,
                           "out.d_weight_in_input_type",
                           "be given with config.strategy vocab_blocks only (the others sum dW "
                           "over row chunks, in fp32 d_weight)",
                           "config.strategy " + std::to_string(static_cast<int>(cfg.strategy)));
      kto::detail::validate_shape(typed_dw, head.weight.rows, head.weight.cols, fn,
                                  "out.d_weight_in_input_type", "head.weight");
      detail::validate_cublas_operand(typed_dw, fn, "out.d_weight_in_input_type");
    }
    detail::validate_cublas_operand(out.d_hidden, fn, "out.d_hidden");
    kto::detail::require(
        out.d_bias.size == 0 || out.d_bias.size == head.weight.rows, fn, "out.d_bias.size",
        "be 0 (skipped) or head.weight.rows (" + std::to_string(head.weight.rows) + ")",
        out.d_bias.size);
    kto::detail::require(cfg.chunk_bytes > 0, fn, "config.chunk_bytes", "be > 0",
                         static_cast<index_t>(cfg.chunk_bytes));
    kto::detail::validate_strategy(cfg.strategy, fn, true);
    using kto::detail::byte_range;
    kto::detail::validate_disjoint(
        {byte_range(out.d_hidden, "out.d_hidden"), byte_range(out.d_weight, "out.d_weight"),
         byte_range(typed_dw, "out.d_weight_in_input_type"), byte_range(out.d_bias, "out.d_bias")},
        {byte_range(in.hidden, "hidden"), byte_range(head.weight, "head.weight"),
         byte_range(head.bias, "head.bias"),
         byte_range(uses_kl_batch(o) ? in.kl.hidden : MatrixView<const T>{}, "kl.hidden")},
        fn);
  } catch (const kto::Error& e) {
    return Status::from(e);
  }
  return Status::success();
}

/// `gather_partials`: vocab parallel, its ranks × (KL rows + rows) gathered partials.
template <class T>
size_t fused_linear_workspace_bytes(const FusedLinearInputs<T>& in, const LinearHead<T>& head,
                                    const FusedLinearConfig& cfg = {},
                                    const RowPartialsAllGather& gather_partials = {}) {
  detail::Carver c(nullptr);
  detail::carve_fused(c, detail::FusedLayout::of(in, cfg, gather_partials), head, cfg);
  return c.used();
}

/// The whole step from hidden states: KL forward → all_reduce (if given) →
/// target chunks (forward, g_s, backward, GEMMs) → finish (loss, metrics).
template <class T>
Status fused_linear_kto_step(cublasHandle_t handle, void* workspace, size_t& workspace_bytes,
                             const FusedLinearInputs<T>& in, const LinearHead<T>& head,
                             const Options& o, const FusedLinearOutputs& out, cudaStream_t stream,
                             const FusedLinearConfig& cfg = {}, const KlAllReduce& all_reduce = {},
                             const RowPartialsAllGather& gather_partials = {}) {
  const char* fn = "kto::cuda::fused_linear_kto_step";
  Status status = can_implement(in, head, o, out, cfg, gather_partials);
  if (!status) return status;
  if (handle == nullptr)
    return Status::make(StatusCode::invalid_argument,
                        "%s: argument 'handle' must be a cuBLAS handle; got nullptr", fn);
  if (!detail::workspace_ready(workspace, workspace_bytes,
                               fused_linear_workspace_bytes(in, head, cfg, gather_partials), status,
                               fn))
    return status;
  detail::Carver c(workspace);
  const detail::FusedBuffers b =
      detail::carve_fused(c, detail::FusedLayout::of(in, cfg, gather_partials), head, cfg);
  status = detail::bind_cublas(handle, stream, b.cublas, cfg.cublas_workspace_bytes, fn);
  if (!status) return status;
  const index_t N = in.hidden.rows, B = in.sequences.count, V = head.weight.rows;
  float* logp = out.logp ? out.logp : b.logp;
  index_t* num_tokens = out.num_tokens ? out.num_tokens : b.num_tokens;
  ExampleOutputs ex{out.examples.ratio ? out.examples.ratio : b.ratio,
                    out.examples.reward ? out.examples.reward : b.reward,
                    out.examples.loss ? out.examples.loss : b.loss,
                    out.examples.grad_logp ? out.examples.grad_logp : b.grad_logp};

  detail::reset_errors(b.errors, stream);
  cudaMemsetAsync(b.partial, 0, sizeof(KlPartial), stream);
  cudaMemsetAsync(b.row_scale, 0, sizeof(float) * static_cast<size_t>(N), stream);
  if (N > 0)  // rows no chunk writes (outside every sequence) stay zero
    cudaMemset2DAsync(out.d_hidden.data, sizeof(float) * out.d_hidden.stride, 0,
                      sizeof(float) * out.d_hidden.cols, static_cast<size_t>(N), stream);
  if (head.bias.size)
    device::convert_kernel<T, float><<<256, 256, 0, stream>>>(head.bias.data, b.bias, V);
  const detail::RowExtras extras =
      detail::row_extras(o, b.row_entropy, b.row_mean_logit, out.token_statistics);
  detail::ChunkRunner<T> runner(handle, head, cfg, std::max(N, in.kl.hidden.rows), b, extras,
                                stream, fn);
  device::convert_kernel<T, T>
      <<<64, 256, 0, stream>>>(nullptr, static_cast<T*>(b.ones), b.ones_count);
  detail::launch_validate_offsets(in.sequences, N, b.errors, 0u, stream);
  const device::BatchRows rows{in.targets, in.sequences, N, o.ignore_index};
  const detail::CompactPlan compact =
      detail::compact_plan(in.host_targets, in.targets.rows, in.host_offsets, B, o.ignore_index);
  detail::launch_compact_rows(compact, rows, b.row_of, b.errors, 0u, stream);
  // Chunk rows: batch rows, or with compact scoring the scored rows (b.row_of).
  const index_t chunked_rows = compact.on ? compact.rows() : N;

  const bool kl_used = uses_kl_batch(o) && in.kl.sequences.count > 0;
  const index_t NK = in.kl.hidden.rows, K = in.kl.sequences.count;
  const device::BatchRows kl_rows{in.kl.targets, in.kl.sequences, NK, o.ignore_index};
  detail::CompactPlan kl_compact;
  if (kl_used) {
    detail::launch_validate_offsets(in.kl.sequences, NK, b.errors, device::kKlBatchTag, stream);
    kl_compact = detail::compact_plan(in.kl.host_targets, in.kl.targets.rows, in.kl.host_offsets, K,
                                      o.ignore_index);
    detail::launch_compact_rows(kl_compact, kl_rows, b.kl_row_of, b.errors, device::kKlBatchTag,
                                stream);
  }
  const index_t kl_chunked_rows = kl_compact.on ? kl_compact.rows() : NK;
  const bool sharded = head.sharded();
  if (sharded) {
    // Vocab parallel: both batches' row partials in one all-gather (the KL batch's rows,
    // when it is used, then the target batch's), merged in rank order into each row's
    // lse and ℓ.
    const index_t kl_gathered = kl_used ? NK : 0, gathered_rows = kl_gathered + N;
    cudaMemsetAsync(b.partials, 0, sizeof(RowPartial<float>) * static_cast<size_t>(gathered_rows),
                    stream);  // rows no chunk visits: defined bytes for the collective
    if (kl_used) {
      status = runner.partials_rows(in.kl.hidden, kl_rows, 0, kl_chunked_rows, b.kl_row_of,
                                    b.partials, device::kKlBatchTag);
      if (!status) return status;
    }
    status = runner.partials_rows(in.hidden, rows, 0, chunked_rows, b.row_of,
                                  b.partials + kl_gathered, 0u);
    if (!status) return status;
    status = gather_partials.gather(b.partials, b.gathered, gathered_rows, stream);
    if (!status) return status;
    const index_t ranks = gather_partials.ranks, V_all = head.total_vocab();
    if (kl_used) {
      device::MergePartialsParams mk{
          b.gathered, ranks,        gathered_rows,   0,        kl_rows,
          V_all,      b.kl_row_lse, b.kl_token_logp, b.errors, device::kKlBatchTag};
      device::merge_partials_kernel<<<256, 256, 0, stream>>>(mk);
    }
    device::MergePartialsParams mt{b.gathered, ranks,     gathered_rows, kl_gathered, rows,
                                   V_all,      b.row_lse, b.token_logp,  b.errors,    0u};
    device::merge_partials_kernel<<<256, 256, 0, stream>>>(mt);
    status = detail::last_launch(fn);
    if (!status) return status;
  }

  // KL batch, forward only → (S, C).
  if (kl_used) {
    if (!sharded) {
      status = runner.forward_rows(in.kl.hidden, kl_rows, 0, kl_chunked_rows, b.kl_row_of,
                                   b.kl_row_lse, b.kl_token_logp, device::kKlBatchTag);
      if (!status) return status;
    }
    runner.sequences(kl_rows, 0, K, o.average_logprob, b.kl_token_logp, b.kl_logp, b.kl_num_tokens,
                     device::kKlBatchTag);
    device::KlParams kp{
        b.kl_logp, in.kl.reference_logp.data, b.kl_num_tokens, K, o.kl_estimator, b.partial,
        b.errors};
    device::kl_partial_kernel<<<1, device::kFinishThreads, 0, stream>>>(kp);
    status = detail::last_launch(fn);
    if (!status) return status;
  }
  if (all_reduce) {
    device::PreCollectiveParams pc{in.reference_logp.data, in.desirable, B, b.partial, b.errors};
    device::note_failures_kernel<<<1, device::kFinishThreads, 0, stream>>>(pc);
    status = all_reduce(b.partial, stream);
    if (!status) return status;
  }

  auto grads_of = [&](index_t s0, index_t s1) {
    device::SequenceGradParams gp{
        b.partial, logp, in.reference_logp.data, in.desirable, num_tokens, rows, s0, s1,
        B,         o,    ex.grad_logp,           b.row_scale};
    device::sequence_grad_kernel<<<static_cast<unsigned>((s1 - s0 + 7) / 8), 256, 0, stream>>>(gp);
  };
  bool first_chunk = true;
  auto backward_rows = [&](index_t first, index_t last, bool recompute) -> Status {
    for (index_t r0 = first; r0 < last; r0 += runner.chunk_rows()) {
      const index_t n = std::min(runner.chunk_rows(), last - r0);
      if (recompute) {
        Status s = runner.logits(in.hidden, rows, r0, n, b.row_of);
        if (!s) return s;
      }
      Status s = runner.backward(rows, r0, n, b.row_of, out, first_chunk);
      if (!s) return s;
      first_chunk = false;
    }
    return Status::success();
  };

  if (sharded) {  // the rows' lse and ℓ are merged: sequences, then the slice's backward
    runner.sequences(rows, 0, B, o.average_logprob, b.token_logp, logp, num_tokens, 0u);
    grads_of(0, B);
    status = backward_rows(0, chunked_rows, true);
    if (!status) return status;
  } else if (cfg.strategy == FusedStrategy::vocab_blocks) {
    status = runner.forward_rows(in.hidden, rows, 0, chunked_rows, b.row_of, b.row_lse,
                                 b.token_logp, 0u);
    if (!status) return status;
    runner.sequences(rows, 0, B, o.average_logprob, b.token_logp, logp, num_tokens, 0u);
    grads_of(0, B);
    if (chunked_rows > 0) {
      status = runner.backward_blocks(in.hidden, rows, chunked_rows, b.row_of, out);
      if (!status) return status;
      first_chunk = false;
    }
  } else if (in.host_offsets && cfg.strategy == FusedStrategy::keep_chunk) {
    const SequencesView host = compact.on ? compact.sequences() : SequencesView{in.host_offsets, B};
    for (const ChunkGroup& g : plan_chunks(host, runner.chunk_rows())) {
      const detail::RowRange group{in.host_offsets[g.first_seq], in.host_offsets[g.last_seq]};
      status = runner.forward_rows(in.hidden, rows, g.first_row, g.last_row, b.row_of, b.row_lse,
                                   b.token_logp, 0u, group);
      if (!status) return status;
      runner.sequences(rows, g.first_seq, g.last_seq, o.average_logprob, b.token_logp, logp,
                       num_tokens, 0u);
      grads_of(g.first_seq, g.last_seq);
      status = backward_rows(g.first_row, g.last_row, g.split);
      if (!status) return status;
    }
  } else {
    status = runner.forward_rows(in.hidden, rows, 0, chunked_rows, b.row_of, b.row_lse,
                                 b.token_logp, 0u);
    if (!status) return status;
    runner.sequences(rows, 0, B, o.average_logprob, b.token_logp, logp, num_tokens, 0u);
    grads_of(0, B);
    status = backward_rows(0, chunked_rows, true);
    if (!status) return status;
  }
  if (first_chunk) {  // no rows: the weight gradients are zero
    if (out.d_weight_in_input_type.data)
      cudaMemset2DAsync(
          out.d_weight_in_input_type.data, sizeof(T) * out.d_weight_in_input_type.stride, 0,
          sizeof(T) * out.d_weight_in_input_type.cols, static_cast<size_t>(V), stream);
    else
      cudaMemset2DAsync(out.d_weight.data, sizeof(float) * out.d_weight.stride, 0,
                        sizeof(float) * out.d_weight.cols, static_cast<size_t>(V), stream);
    if (out.d_bias.size)
      cudaMemsetAsync(out.d_bias.data, 0, sizeof(float) * static_cast<size_t>(V), stream);
  }
  device::FinishParams fp{
      b.partial, logp,    in.reference_logp.data, in.desirable, B,       o, ex.ratio,
      ex.reward, ex.loss, ex.grad_logp,           out.metrics,  b.errors};
  device::finish_kernel<<<1, device::kFinishThreads, 0, stream>>>(fp);
  return detail::last_launch(fn);
}

/// Forward only: logp_s and n_s of a batch from its hidden states (the
/// reference model's log-probs, or a KL batch's), never holding N × V.
/// `compact`: the layout for host targets and offsets (compact scoring).
template <class T>
size_t fused_linear_logprobs_workspace_bytes(index_t rows, const LinearHead<T>& head,
                                             const FusedLinearConfig& cfg = {},
                                             bool compact = false) {
  detail::Carver c(nullptr);
  detail::carve_fused(c, detail::FusedLayout::forward_only(rows, compact), head, cfg);
  return c.used();
}

/// With host copies of the targets and offsets (`host_offsets`, `host_targets`, the
/// targets' layout), the GEMMs multiply the scored rows only, as in the step.
template <class T>
Status fused_linear_logprobs(cublasHandle_t handle, void* workspace, size_t& workspace_bytes,
                             const MatrixView<const T>& hidden, const TargetsView& targets,
                             const SequencesView& sequences, const LinearHead<T>& head,
                             const Options& o, float* logp, index_t* num_tokens,
                             cudaStream_t stream, const FusedLinearConfig& cfg = {},
                             const SequenceTokenStatistics& statistics = {},
                             const index_t* host_offsets = nullptr,
                             const index_t* host_targets = nullptr) {
  detail::check_logit_type<T>();
  const char* fn = "kto::cuda::fused_linear_logprobs";
  try {
    validate_options(o, fn);
    detail::validate_cuda_head(head, fn, false);
    detail::validate_hidden(hidden, targets, sequences, head, fn, "", true);
    kto::detail::require(logp != nullptr || sequences.count == 0, fn, "logp", "be non-null",
                         "nullptr");
    kto::detail::require(num_tokens != nullptr || sequences.count == 0, fn, "num_tokens",
                         "be non-null", "nullptr");
    detail::validate_statistics(statistics, o, sequences.count, fn, "statistics");
    if (host_offsets)
      kto::detail::validate_sequences(SequencesView{host_offsets, sequences.count}, hidden.rows, fn,
                                      "host_offsets", true);
    detail::validate_compact(host_targets, host_offsets, fn, "");
  } catch (const kto::Error& e) {
    return Status::from(e);
  }
  if (handle == nullptr)
    return Status::make(StatusCode::invalid_argument,
                        "%s: argument 'handle' must be a cuBLAS handle; got nullptr", fn);
  Status status;
  const detail::CompactPlan compact = detail::compact_plan(host_targets, targets.rows, host_offsets,
                                                           sequences.count, o.ignore_index);
  if (!detail::workspace_ready(
          workspace, workspace_bytes,
          fused_linear_logprobs_workspace_bytes(hidden.rows, head, cfg, compact.on), status, fn))
    return status;
  detail::Carver c(workspace);
  const detail::FusedBuffers b =
      detail::carve_fused(c, detail::FusedLayout::forward_only(hidden.rows, compact.on), head, cfg);
  status = detail::bind_cublas(handle, stream, b.cublas, cfg.cublas_workspace_bytes, fn);
  if (!status) return status;
  detail::reset_errors(b.errors, stream);
  if (head.bias.size)
    device::convert_kernel<T, float>
        <<<256, 256, 0, stream>>>(head.bias.data, b.bias, head.weight.rows);
  detail::launch_validate_offsets(sequences, hidden.rows, b.errors, 0u, stream);
  detail::ChunkRunner<T> runner(handle, head, cfg, hidden.rows, b,
                                detail::row_extras(o, b.row_entropy, b.row_mean_logit, statistics),
                                stream, fn);
  const device::BatchRows rows{targets, sequences, hidden.rows, o.ignore_index};
  detail::launch_compact_rows(compact, rows, b.row_of, b.errors, 0u, stream);
  status = runner.forward_rows(hidden, rows, 0, compact.on ? compact.rows() : hidden.rows, b.row_of,
                               b.row_lse, b.token_logp, 0u);
  if (!status) return status;
  runner.sequences(rows, 0, sequences.count, o.average_logprob, b.token_logp, logp, num_tokens, 0u);
  return detail::last_launch(fn);
}

}  // namespace cuda
}  // namespace kto
