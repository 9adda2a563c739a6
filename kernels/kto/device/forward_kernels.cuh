// forward_kernels.cuh — from logits to per-row lse, ℓ_r and per-sequence logp.
//
//   validate_offsets_kernel   offsets non-decreasing, in [0, rows]
//   row_forward_kernel        one pass over a row: lse_r = m + log Σ e^(z − m),
//                             ℓ_r = z[t_r] − lse_r (never log(softmax))
//   sequence_logp_kernel      logp_s = Σ ℓ_r over the scored rows of s (÷ n_s)
//
// A row is handled by a group of kThreads threads: a warp for short rows
// (kThreads = 32, several rows per block) or the whole block for long ones
// (a 128K-vocab bf16 row is 256 KB: no shared-memory staging, each thread
// folds a strided slice of 16-byte vectors into its own (m, s) in registers).
// Rows outside [offsets[0], offsets[count]) and ignored rows cost one target
// read. Offsets are clamped to [0, rows] before use, so a bad offset array is
// reported, never followed out of bounds.
//
// Instantiated with kExtended, a row's logits pass through the logit transform
// (logit_transform.cuh) as they are read, and the read also yields the row's
// entropy and mean logit (StatisticsState); sequence_logp_kernel then sums them
// per sequence. The plain instantiation is the default path, untouched.
#pragma once

#include <type_traits>

#include <kto/layout.hpp>
#include <kto/token_statistics.hpp>

#include "device_errors.cuh"
#include "logit_transform.cuh"
#include "lse_state.cuh"
#include "numeric.cuh"

namespace kto {
namespace device {

KTO_HOST_DEVICE inline index_t clamp_row(index_t r, index_t rows) {
  return r < 0 ? 0 : (r > rows ? rows : r);
}

/// [first, last) rows covered by the sequences, clamped to the matrix.
KTO_HOST_DEVICE inline void covered_rows(const SequencesView& seqs, index_t rows, index_t& first,
                                         index_t& last) {
  first = clamp_row(seqs.offsets[0], rows);
  last = clamp_row(seqs.offsets[seqs.count], rows);
  if (last < first) last = first;
}

/// Target id of row r, or ignore_index when r lies outside every sequence.
KTO_HOST_DEVICE inline index_t row_target(const SequencesView& seqs, const TargetsView& targets,
                                          index_t rows, index_t r, index_t ignore_index) {
  index_t first, last;
  covered_rows(seqs, rows, first, last);
  return r >= first && r < last ? targets.at(r) : ignore_index;
}

__global__ void validate_offsets_kernel(SequencesView seqs, index_t rows, DeviceErrors* errors,
                                        unsigned error_tag) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i <= seqs.count;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t off = seqs.offsets[i];
    const bool ok = off >= 0 && off <= rows && (i == 0 || seqs.offsets[i - 1] <= off);
    if (!ok) record_error(errors, i, kInvalidOffsets | error_tag);
  }
}

template <class T>
struct ForwardParams {
  LogitsView<const T> logits;
  TargetsView targets;
  SequencesView sequences;
  index_t ignore_index;
  float* row_lse;     ///< rows; 0 where not scored (never read)
  float* token_logp;  ///< rows; 0 where not scored
  DeviceErrors* errors;
  unsigned error_tag;               ///< 0 for the target batch, kKlBatchTag for the KL batch
  RowTransform transform{};         ///< read by the kExtended kernels only
  float* row_entropy = nullptr;     ///< rows, kExtended: entropy (0 where not scored); null: skip
  float* row_mean_logit = nullptr;  ///< rows, with row_entropy: mean logit
};

/// The per-thread state of a row pass: (m, s), or with kExtended the statistics too.
template <bool kExtended>
using RowState = std::conditional_t<kExtended, StatisticsState, LseState>;

/// Element value as the pass sees it: widened, and with kExtended transformed.
template <bool kExtended, class T>
KTO_HOST_DEVICE inline float row_value(T x, const RowTransform& transform) {
  if constexpr (kExtended) {
    return transform.apply(to_float(x));
  } else {
    return to_float(x);
  }
}

/// Folds this thread's slice of a row into its state.
template <class T, int kThreads, bool kExtended = false>
KTO_HOST_DEVICE inline RowState<kExtended> thread_row_lse(const T* row, index_t vocab, int lane,
                                                          const RowTransform& transform = {}) {
  constexpr int W = Vec<T>::kWidth;
  RowState<kExtended> st = identity_of<RowState<kExtended>>();
  const float inv_vocab = 1.0f / static_cast<float>(vocab);  // the mean logit's weight
  const RowSpan span = row_span<T>(row, vocab);
  for (index_t i = lane; i < span.head; i += kThreads) {
    const float x[1] = {row_value<kExtended>(row[i], transform)};
    lse_update(st, x, inv_vocab);
  }
  const Vec<T>* vec = reinterpret_cast<const Vec<T>*>(row + span.head);
  KTO_UNROLL(4)
  for (index_t i = lane; i < span.vectors; i += kThreads) {
    const Vec<T> v = load_vector(vec + i);
    float x[W];
    KTO_UNROLL()
    for (int k = 0; k < W; ++k) x[k] = row_value<kExtended>(v.v[k], transform);
    lse_update(st, x, inv_vocab);
  }
  for (index_t i = span.tail + lane; i < vocab; i += kThreads) {
    const float x[1] = {row_value<kExtended>(row[i], transform)};
    lse_update(st, x, inv_vocab);
  }
  return st;
}

/// Lane 0's writes for a scored row: lse, ℓ (target value already transformed),
/// and with kExtended the statistics; a non-finite lse or ℓ is recorded.
template <bool kExtended>
__device__ inline void finish_row(const RowState<kExtended>& st, float target_value, index_t vocab,
                                  index_t r, float* row_lse, float* token_logp, float* row_entropy,
                                  float* row_mean_logit, DeviceErrors* errors, unsigned tag) {
  const float lse = st.m + logf(st.s);
  const float lp = target_value - lse;
  if (!(isfinite(lse) && isfinite(lp))) record_error(errors, r, kNonFiniteLogits | tag);
  row_lse[r] = lse;
  token_logp[r] = lp;
  if constexpr (kExtended) {
    if (row_entropy) {
      const TokenStatistics<float> ts = token_statistics(st.s, st.w, st.t);
      row_entropy[r] = ts.entropy;
      row_mean_logit[r] = ts.mean_logit;
    }
  }
}

template <class T, int kThreads, int kRowsPerBlock, bool kExtended>
__global__ void __launch_bounds__(kThreads* kRowsPerBlock) row_forward_kernel(ForwardParams<T> p) {
  const int lane = static_cast<int>(threadIdx.x) % kThreads;
  const index_t r = static_cast<index_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreads;
  const index_t rows = p.logits.rows.rows;
  // Exits are uniform per group: a warp (kThreads = 32) or the block (one row).
  if (r >= rows) return;
  const index_t t = row_target(p.sequences, p.targets, rows, r, p.ignore_index);
  if (t == p.ignore_index || t < 0 || t >= p.logits.vocab) {
    if (lane == 0) {
      p.row_lse[r] = 0.0f;
      p.token_logp[r] = 0.0f;
      if constexpr (kExtended) {
        if (p.row_entropy) p.row_entropy[r] = p.row_mean_logit[r] = 0.0f;
      }
      if (t != p.ignore_index) record_error(p.errors, r, kTargetOutOfRange | p.error_tag);
    }
    return;
  }
  const T* row = p.logits.row(r);
  auto st = thread_row_lse<T, kThreads, kExtended>(row, p.logits.vocab, lane, p.transform);
  st = group_reduce_lse<kThreads>(st);
  if (lane == 0)
    finish_row<kExtended>(st, row_value<kExtended>(row[t], p.transform), p.logits.vocab, r,
                          p.row_lse, p.token_logp, p.row_entropy, p.row_mean_logit, p.errors,
                          p.error_tag);
}

struct SequenceParams {
  TargetsView targets;
  SequencesView sequences;
  index_t rows;
  index_t ignore_index;
  bool average;
  const float* token_logp;
  float* logp;                         ///< per sequence
  index_t* num_tokens;                 ///< per sequence
  const float* row_entropy = nullptr;  ///< rows; null: no statistics
  const float* row_mean_logit = nullptr;
  double* entropy_sum = nullptr;  ///< per sequence, with row_entropy
  double* mean_logit_sum = nullptr;
};

/// One warp per sequence; lanes sum strided rows in double, then a fixed
/// butterfly adds the 32 partials: the same bits every run.
__global__ void sequence_logp_kernel(SequenceParams p) {
  const int lane = threadIdx.x % 32;
  const index_t s = static_cast<index_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (s >= p.sequences.count) return;
  const index_t begin = clamp_row(p.sequences.begin(s), p.rows);
  index_t end = clamp_row(p.sequences.end(s), p.rows);
  if (end < begin) end = begin;
  const bool statistics = p.row_entropy != nullptr;
  double sum = 0.0, entropy = 0.0, mean_logit = 0.0;
  long long n = 0;
  for (index_t r = begin + lane; r < end; r += 32) {
    if (p.targets.at(r) == p.ignore_index) continue;
    sum += static_cast<double>(p.token_logp[r]);
    if (statistics) {
      entropy += static_cast<double>(p.row_entropy[r]);
      mean_logit += static_cast<double>(p.row_mean_logit[r]);
    }
    ++n;
  }
  KTO_UNROLL()
  for (int offset = 16; offset > 0; offset >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    n += __shfl_xor_sync(0xffffffffu, n, offset);
    if (statistics) {
      entropy += __shfl_xor_sync(0xffffffffu, entropy, offset);
      mean_logit += __shfl_xor_sync(0xffffffffu, mean_logit, offset);
    }
  }
  if (lane == 0) {
    if (p.average && n > 0) sum /= static_cast<double>(n);
    p.logp[s] = static_cast<float>(sum);
    p.num_tokens[s] = static_cast<index_t>(n);
    if (statistics) {
      p.entropy_sum[s] = entropy;
      p.mean_logit_sum[s] = mean_logit;
    }
  }
}

}  // namespace device
}  // namespace kto
