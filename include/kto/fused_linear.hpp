// fused_linear.hpp — the KTO step from hidden states and the lm_head (shared part).
//
// The logits Z = H Wᵀ + b of a batch are N × V: at V = 128K they outweigh the
// model's activations. The fused-linear step never holds them whole. It walks
// the rows in chunks of at most `chunk_rows`, and for each chunk
//
//   Z_c = H_c Wᵀ + b  →  lse_r, ℓ_r  →  logp_s  →  g_s  →  dZ_c (in place)
//   dH_c = dZ_c W,   dW += dZ_cᵀ H_c,   db += Σ_r dZ_c[r, :]
//
// That order needs g_s before the chunk's backward, so a chunk holds whole
// sequences (plan_chunks) and the KL batch, forward only, runs first to give
// z0. A sequence longer than a chunk is the one exception: its rows are walked
// twice, forward (keeping lse_r, two floats a row) then backward with the
// logits recomputed, which is also how the vocab-parallel step works.
//
// Vocab-parallel (tensor-parallel lm_head): rank k holds rows
// [vocab_begin, vocab_begin + V_k) of W. For each row it computes a RowPartial,
// the log-sum-exp over its slice and the target logit if it owns the target
// (0 otherwise). The caller all-gathers the partials (one collective, two
// floats a row); merge_row_partials() gives every rank the same lse_r and
// target logit, so the finish is identical on all ranks and the backward needs
// no further communication: dW and db are the rank's own slice, dH is a
// partial sum over ranks, all-reduced by the caller as for any TP lm_head.
#pragma once

#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "config.hpp"
#include "error.hpp"
#include "layout.hpp"
#include "validate.hpp"

namespace kto {

/// The default chunk budget of each device, in one home, each chosen by measurement
/// on the path users run. CPU: 64 MiB (bench/compare_trl.py, TRL 1.16's trainer step
/// on a 2-vCPU EPYC: within 2 % of the fastest budget and the least memory of the
/// fast ones; docs/performance.md). CUDA: 1 GiB (bench_fused_cuda on an H200 at
/// Liger's shape; docs/fused-linear.md).
constexpr size_t kDefaultCpuChunkBytes = size_t{64} << 20;
constexpr size_t kDefaultCudaChunkBytes = size_t{1} << 30;

/// keep_chunk: Z_c computed once per chunk of whole sequences (3 GEMMs a row);
/// recompute: forward over every chunk, then Z_c recomputed for the backward (4).
/// Both accumulate dW across row chunks, so it is held in fp32 (V × D).
/// vocab_blocks (CUDA only): forward over row chunks, then the backward by blocks
/// of vocabulary columns over all rows at once (4 GEMMs a row): each block of dW
/// is one GEMM, fp32 inside, written once in the output's type (the weight's,
/// with FusedLinearOutputs::d_weight_in_input_type), so no V × D fp32 accumulator.
enum class FusedStrategy : int { keep_chunk = 0, recompute = 1, vocab_blocks = 2 };

/// The strategies' names at their codes: what the bindings accept for `strategy`.
constexpr int kFusedStrategyCount = 3;
constexpr const char* kFusedStrategyNames[kFusedStrategyCount] = {"keep_chunk", "recompute",
                                                                  "vocab_blocks"};

/// The lm_head, or this rank's vocabulary slice of it: weight is V_local × D
/// (torch.nn.Linear's layout), bias V_local entries or empty (no bias).
template <class T>
struct LinearHead {
  MatrixView<const T> weight;
  Span<const T> bias;
  index_t vocab_begin = 0;  ///< global id of weight row 0
  index_t vocab_total = 0;  ///< global vocabulary; 0 means weight.rows (not sharded)
  KTO_HOST_DEVICE index_t total_vocab() const {
    return vocab_total > 0 ? vocab_total : weight.rows;
  }
  KTO_HOST_DEVICE bool sharded() const { return total_vocab() != weight.rows; }
};

/// The most vocabulary slices a step gathers (CUDA's workspace holds ranks × rows
/// partials); both paths refuse more.
constexpr index_t kMaxVocabRanks = index_t{1} << 16;

/// One vocabulary slice's share of a row: lse over the slice, and the target
/// logit if the slice holds the target (0 otherwise).
template <class Acc>
struct RowPartial {
  Acc lse;
  Acc target_logit;
};

/// lse of the union of two slices, target logits added (only one is nonzero).
template <class Acc>
KTO_HOST_DEVICE inline RowPartial<Acc> merge_row_partial(RowPartial<Acc> a, RowPartial<Acc> b) {
  const Acc m = a.lse > b.lse ? a.lse : b.lse;
  RowPartial<Acc> out;
  out.target_logit = a.target_logit + b.target_logit;
  if (m == -static_cast<Acc>(INFINITY) || !(m == m)) {  // INFINITY: usable in device code
    out.lse = a.lse + b.lse;                            // −inf stays −inf, NaN stays NaN
  } else {
    out.lse = m + std::log(std::exp(a.lse - m) + std::exp(b.lse - m));
  }
  return out;
}

/// Merges the partials all-gathered from `ranks` slices (rank-major: entry
/// k·rows + r is rank k's row r) in rank order, so every rank gets the same bits.
template <class Acc>
std::vector<RowPartial<Acc>> merge_row_partials(const std::vector<RowPartial<Acc>>& gathered,
                                                index_t ranks) {
  const char* fn = "kto::merge_row_partials";
  detail::require(ranks >= 1, fn, "ranks", "be >= 1", ranks);
  detail::require(static_cast<index_t>(gathered.size()) % ranks == 0, fn, "gathered.size()",
                  "be a multiple of ranks (" + std::to_string(ranks) + ")",
                  static_cast<index_t>(gathered.size()));
  const auto rows = static_cast<index_t>(gathered.size()) / ranks;
  std::vector<RowPartial<Acc>> out(gathered.begin(), gathered.begin() + rows);
  for (index_t k = 1; k < ranks; ++k)
    for (index_t r = 0; r < rows; ++r)
      out[static_cast<size_t>(r)] = merge_row_partial(out[static_cast<size_t>(r)],
                                                      gathered[static_cast<size_t>(k * rows + r)]);
  return out;
}

/// Rows of a logits chunk that fit `budget_bytes` at `bytes_per_row`, at
/// least 1 and at most `max_rows` (no chunk larger than the batch it walks).
inline index_t chunk_rows_for_budget(std::size_t budget_bytes, std::size_t bytes_per_row,
                                     index_t max_rows) {
  const std::size_t rows = bytes_per_row > 0 ? budget_bytes / bytes_per_row : 0;
  const auto cap = static_cast<std::size_t>(max_rows > 1 ? max_rows : 1);
  return static_cast<index_t>(rows < 1 ? 1 : (rows < cap ? rows : cap));
}

/// Rows [first_row, last_row) holding sequences [first_seq, last_seq). A group
/// wider than the chunk is a single sequence, walked in pieces (recomputed).
struct ChunkGroup {
  index_t first_row, last_row;
  index_t first_seq, last_seq;
  bool split;
};

/// Packs consecutive whole sequences into groups of at most `chunk_rows` rows.
/// `sequences.offsets` must be host memory and valid (validate_sequences).
inline std::vector<ChunkGroup> plan_chunks(const SequencesView& sequences, index_t chunk_rows) {
  std::vector<ChunkGroup> plan;
  index_t s = 0;
  while (s < sequences.count) {
    ChunkGroup g{sequences.begin(s), sequences.end(s), s, s + 1, false};
    if (g.last_row - g.first_row > chunk_rows) {
      g.split = true;
      plan.push_back(g);
      ++s;
      continue;
    }
    while (g.last_seq < sequences.count && sequences.end(g.last_seq) - g.first_row <= chunk_rows) {
      g.last_row = sequences.end(g.last_seq);
      ++g.last_seq;
    }
    plan.push_back(g);
    s = g.last_seq;
  }
  return plan;
}

namespace detail {

template <class T>
void validate_head(const LinearHead<T>& h, const char* fn) {
  validate_matrix(h.weight, fn, "head.weight");
  require(h.weight.rows >= 1, fn, "head.weight.rows", "be >= 1 (the vocabulary slice)",
          h.weight.rows);
  require(h.vocab_total == 0 || h.vocab_total >= h.weight.rows, fn, "head.vocab_total",
          "be 0 (not sharded) or >= head.weight.rows (" + std::to_string(h.weight.rows) + ")",
          h.vocab_total);
  // Written as a difference: vocab_begin + rows could overflow.
  require(h.vocab_begin >= 0 && h.vocab_begin <= h.total_vocab() - h.weight.rows, fn,
          "head.vocab_begin",
          "place the slice inside [0, " + std::to_string(h.total_vocab()) + ") with its " +
              std::to_string(h.weight.rows) + " rows",
          h.vocab_begin);
  require(h.bias.size == 0 || h.bias.size == h.weight.rows, fn, "head.bias.size",
          "be 0 (no bias) or head.weight.rows (" + std::to_string(h.weight.rows) + ")",
          h.bias.size);
  require(h.bias.data != nullptr || h.bias.size == 0, fn, "head.bias.data",
          "be non-null when size > 0", "nullptr");
}

/// `vocab_blocks`: whether the caller implements FusedStrategy::vocab_blocks.
inline void validate_strategy(FusedStrategy s, const char* fn, bool vocab_blocks) {
  if (vocab_blocks)
    require(s == FusedStrategy::keep_chunk || s == FusedStrategy::recompute ||
                s == FusedStrategy::vocab_blocks,
            fn, "config.strategy", "be keep_chunk (0), recompute (1) or vocab_blocks (2)",
            static_cast<int>(s));
  else
    require(s == FusedStrategy::keep_chunk || s == FusedStrategy::recompute, fn, "config.strategy",
            s == FusedStrategy::vocab_blocks
                ? "be keep_chunk (0) or recompute (1) (vocab_blocks is CUDA only)"
                : "be keep_chunk (0) or recompute (1)",
            static_cast<int>(s));
}

}  // namespace detail
}  // namespace kto
