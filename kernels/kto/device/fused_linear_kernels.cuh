// fused_linear_kernels.cuh — the row kernels between the fused-linear GEMMs.
//
// They see one chunk of fp32 logits Z_c straight from the GEMM: `rows` rows of
// `vocab` values, `ld` apart (ld a multiple of 4 and a 16-byte aligned base,
// so every row is read as float4). Chunk row i is batch row row_begin + i.
// The bias is added on the fly and never stored:
//
//   chunk_forward_kernel   lse_r = log Σ_v e^(Z[i,v] + b_v),  ℓ_r = Z[i,t] + b_t − lse_r
//   sequence_grad_kernel   g_s = ∂L/∂logp_s (example_terms, as the finish does)
//                          and the row scales g_s c_r of the sequence's scored rows
//   chunk_backward_kernel  dZ[i,v] = scale_r (1[v = t] − e^(Z[i,v] + b_v − lse_r)),
//                          written in the GEMM input type (bf16/half) for the
//                          dH and dW products, or in place for float; over a
//                          row's whole vocabulary or one block of its columns
//
// Row groups are a warp (short rows) or the whole block (long rows), as in
// forward_kernels.cuh; states merge in a fixed tree, so results are
// bit-identical run after run. With kExtended, as there, each Z + b passes
// through the logit transform, the forward also yields the row's token
// statistics, and dZ carries the transform's derivative.
#pragma once

#include <cuda_runtime.h>

#include <kto/example_loss.hpp>
#include <kto/fused_linear.hpp>
#include <kto/layout.hpp>
#include <kto/options.hpp>
#include <kto/reference_point.hpp>

#include "backward_kernel.cuh"
#include "device_errors.cuh"
#include "forward_kernels.cuh"
#include "lse_state.cuh"
#include "numeric.cuh"

namespace kto {
namespace device {

/// One chunk of fp32 logits and the fp32 bias (null: none). Chunk row i is batch row
/// row_begin + i, or with compact scoring row_of[row_begin + i] (the scored rows only).
struct ChunkView {
  const float* logits;
  index_t ld;
  index_t vocab;
  const float* bias;
  index_t row_begin;
  index_t rows;
  const index_t* row_of = nullptr;
  /// With row_of: the batch rows the host planned this chunk's group over (its
  /// sequences' rows); a mapped row outside means the host targets differ.
  index_t group_first = 0, group_last = kAnyRow;
  static constexpr index_t kAnyRow = index_t{1} << 62;
  KTO_HOST_DEVICE index_t batch_row(index_t i) const {
    return row_of ? row_of[row_begin + i] : row_begin + i;
  }
};

/// The batch the chunk belongs to: which rows are scored, and their targets.
struct BatchRows {
  TargetsView targets;
  SequencesView sequences;
  index_t rows;
  index_t ignore_index;
  KTO_HOST_DEVICE index_t target(index_t r) const {
    return row_target(sequences, targets, rows, r, ignore_index);
  }
};

/// This thread's state over its float4 slices of Z[i, :] + b, then the tail.
template <int kThreads, bool kExtended = false>
KTO_HOST_DEVICE inline RowState<kExtended> thread_biased_lse(const float* row, const float* bias,
                                                             index_t vocab, int lane,
                                                             const RowTransform& transform = {}) {
  RowState<kExtended> st = identity_of<RowState<kExtended>>();
  const float inv_vocab = 1.0f / static_cast<float>(vocab);  // the mean logit's weight
  const index_t vectors = vocab / 4;
  const float4* z4 = reinterpret_cast<const float4*>(row);
  const float4* b4 = reinterpret_cast<const float4*>(bias);
  KTO_UNROLL(4)
  for (index_t i = lane; i < vectors; i += kThreads) {
    float4 z = z4[i];
    if (bias) {
      const float4 b = b4[i];
      z.x += b.x, z.y += b.y, z.z += b.z, z.w += b.w;
    }
    const float x[4] = {row_value<kExtended>(z.x, transform), row_value<kExtended>(z.y, transform),
                        row_value<kExtended>(z.z, transform), row_value<kExtended>(z.w, transform)};
    lse_update(st, x, inv_vocab);
  }
  for (index_t v = vectors * 4 + lane; v < vocab; v += kThreads) {
    const float x[1] = {row_value<kExtended>(row[v] + (bias ? bias[v] : 0.0f), transform)};
    lse_update(st, x, inv_vocab);
  }
  return st;
}

struct ChunkForwardParams {
  ChunkView z;
  BatchRows batch;
  float* row_lse;     ///< batch rows; 0 where not scored (never read)
  float* token_logp;  ///< batch rows; 0 where not scored
  DeviceErrors* errors;
  unsigned error_tag;
  RowTransform transform{};      ///< kExtended only
  float* row_entropy = nullptr;  ///< batch rows, kExtended; null: skip
  float* row_mean_logit = nullptr;
};

/// Chunk row i's batch row and target; lane 0 records a row outside the host's plan
/// (compact scoring) and a target outside the vocabulary. Not scored: ignore_index or
/// out of range (the forward writes zeros for it).
struct ChunkRowTarget {
  index_t r, t;
  bool scored;
};
__device__ inline ChunkRowTarget chunk_row_target(const ChunkView& z, const BatchRows& batch,
                                                  index_t i, int lane, DeviceErrors* errors,
                                                  unsigned tag) {
  ChunkRowTarget c;
  c.r = z.batch_row(i);
  if (z.row_of && lane == 0 && (c.r < z.group_first || c.r >= z.group_last))
    record_error(errors, c.r, kHostTargetsMismatch | tag);
  c.t = batch.target(c.r);
  c.scored = c.t != batch.ignore_index && c.t >= 0 && c.t < z.vocab;
  if (!c.scored && lane == 0 && c.t != batch.ignore_index)
    record_error(errors, c.r, kTargetOutOfRange | tag);
  return c;
}

template <int kThreads, int kRowsPerBlock, bool kExtended>
__global__ void __launch_bounds__(kThreads* kRowsPerBlock)
    chunk_forward_kernel(ChunkForwardParams p) {
  const int lane = static_cast<int>(threadIdx.x) % kThreads;
  const index_t i = static_cast<index_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreads;
  if (i >= p.z.rows) return;  // uniform per row group
  const auto [r, t, scored] = chunk_row_target(p.z, p.batch, i, lane, p.errors, p.error_tag);
  if (!scored) {
    if (lane == 0) {
      p.row_lse[r] = 0.0f;
      p.token_logp[r] = 0.0f;
      if constexpr (kExtended) {
        if (p.row_entropy) p.row_entropy[r] = p.row_mean_logit[r] = 0.0f;
      }
    }
    return;
  }
  const float* row = p.z.logits + i * p.z.ld;
  auto st = thread_biased_lse<kThreads, kExtended>(row, p.z.bias, p.z.vocab, lane, p.transform);
  st = group_reduce_lse<kThreads>(st);
  if (lane == 0) {
    const float target_value =
        row_value<kExtended>(row[t] + (p.z.bias ? p.z.bias[t] : 0.0f), p.transform);
    finish_row<kExtended>(st, target_value, p.z.vocab, r, p.row_lse, p.token_logp, p.row_entropy,
                          p.row_mean_logit, p.errors, p.error_tag);
  }
}

// ------------------------------------------------------------ vocab parallel --
// A rank holding vocabulary columns [col_begin, col_begin + cols) writes each row's
// RowPartial (the log-sum-exp over its columns, the target logit if it holds the
// target, else 0); the caller all-gathers them, and merge_partials_kernel folds the
// ranks in rank order into lse_r and ℓ_r, the same bits on every rank.

struct ChunkPartialsParams {
  ChunkView z;  ///< the rank's columns: z.vocab the whole vocabulary, z.bias the slice's
  index_t col_begin, cols;
  BatchRows batch;
  RowPartial<float>* partials;  ///< batch rows; {0, 0} where not scored
  DeviceErrors* errors;
  unsigned error_tag;
  RowTransform transform{};  ///< kExtended only
};

/// What lane 0 of chunk row i's group writes, from the group's reduced state.
template <bool kExtended>
KTO_HOST_DEVICE inline RowPartial<float> slice_partial(const RowState<kExtended>& st,
                                                       const float* row, const float* bias,
                                                       index_t target, index_t col_begin,
                                                       index_t cols,
                                                       const RowTransform& transform) {
  const index_t k = target - col_begin;  // the target's column in the slice, if held
  const bool held = k >= 0 && k < cols;
  return RowPartial<float>{
      st.m + logf(st.s),
      held ? row_value<kExtended>(row[k] + (bias ? bias[k] : 0.0f), transform) : 0.0f};
}

template <int kThreads, int kRowsPerBlock, bool kExtended>
__global__ void __launch_bounds__(kThreads* kRowsPerBlock)
    chunk_partials_kernel(ChunkPartialsParams p) {
  const int lane = static_cast<int>(threadIdx.x) % kThreads;
  const index_t i = static_cast<index_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreads;
  if (i >= p.z.rows) return;  // uniform per row group
  const auto [r, t, scored] = chunk_row_target(p.z, p.batch, i, lane, p.errors, p.error_tag);
  if (!scored) {
    if (lane == 0) p.partials[r] = RowPartial<float>{0.0f, 0.0f};
    return;
  }
  const float* row = p.z.logits + i * p.z.ld;
  auto st = thread_biased_lse<kThreads, kExtended>(row, p.z.bias, p.cols, lane, p.transform);
  st = group_reduce_lse<kThreads>(st);
  if (lane == 0)
    p.partials[r] =
        slice_partial<kExtended>(st, row, p.z.bias, t, p.col_begin, p.cols, p.transform);
}

/// Row r's partials of `ranks` slices (rank-major, `rows` apart) folded in rank order
/// with kto::merge_row_partial, as kto::merge_row_partials does on the host.
KTO_HOST_DEVICE inline RowPartial<float> merge_gathered(const RowPartial<float>* gathered,
                                                        index_t ranks, index_t rows, index_t r) {
  RowPartial<float> out = gathered[r];
  for (index_t k = 1; k < ranks; ++k) out = merge_row_partial(out, gathered[k * rows + r]);
  return out;
}

struct MergePartialsParams {
  const RowPartial<float>* gathered;  ///< ranks × `stride` partials, rank-major
  index_t ranks, stride;
  index_t first;      ///< this batch's first row among each rank's `stride`
  BatchRows batch;    ///< batch.rows rows
  index_t vocab;      ///< the whole vocabulary: targets past it are not scored
  float* row_lse;     ///< batch rows; 0 where not scored
  float* token_logp;  ///< batch rows; 0 where not scored
  DeviceErrors* errors;
  unsigned error_tag;
};

/// lse_r and ℓ_r = target logit − lse_r of every scored row from the gathered partials;
/// a non-finite one and a target outside the vocabulary are reported as the
/// whole-vocabulary forward reports them (partials gathered before the step passed no
/// kernel of this step's that would).
__global__ void merge_partials_kernel(MergePartialsParams p) {
  for (index_t r = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; r < p.batch.rows;
       r += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t t = p.batch.target(r);
    if (t == p.batch.ignore_index || t < 0 || t >= p.vocab) {  // as the whole-vocabulary forward
      if (t != p.batch.ignore_index) record_error(p.errors, r, kTargetOutOfRange | p.error_tag);
      p.row_lse[r] = p.token_logp[r] = 0.0f;
      continue;
    }
    const RowPartial<float> m = merge_gathered(p.gathered + p.first, p.ranks, p.stride, r);
    const float lp = m.target_logit - m.lse;
    if (!(isfinite(m.lse) && isfinite(lp)))
      record_error(p.errors, r, kNonFiniteLogits | p.error_tag);
    p.row_lse[r] = m.lse;
    p.token_logp[r] = lp;
  }
}

struct SequenceGradParams {
  const KlPartial* partial;  ///< all-reduced
  const float* logp;
  const float* reference_logp;
  const std::uint8_t* desirable;
  const index_t* num_tokens;
  BatchRows batch;
  index_t first_seq, last_seq;
  index_t count;  ///< examples in the batch (the mean reduction's default divisor)
  Options options;
  float* grad_logp;  ///< per sequence
  float* row_scale;  ///< per row: g_s c_r on scored rows
};

/// One warp per sequence of [first_seq, last_seq).
__global__ void sequence_grad_kernel(SequenceGradParams p) {
  const int lane = threadIdx.x % 32;
  const index_t s =
      p.first_seq + static_cast<index_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (s >= p.last_seq) return;
  const double z0 = reference_point(*p.partial, p.options);
  const double scale = reduction_scale(p.options, p.count);
  const double rho = static_cast<double>(p.logp[s]) - static_cast<double>(p.reference_logp[s]);
  const float g =
      static_cast<float>(example_terms(rho, p.desirable[s] != 0, z0, p.options, scale).grad_logp);
  if (lane == 0) p.grad_logp[s] = g;
  const float row_scale = static_cast<float>(
      token_scale(static_cast<double>(g), p.num_tokens[s], p.options.average_logprob));
  const index_t begin = clamp_row(p.batch.sequences.begin(s), p.batch.rows);
  const index_t end = clamp_row(p.batch.sequences.end(s), p.batch.rows);
  for (index_t r = begin + lane; r < end; r += 32)
    p.row_scale[r] = p.batch.target(r) != p.batch.ignore_index ? row_scale : 0.0f;
}

template <class T>
struct ChunkBackwardParams {
  ChunkView z;
  BatchRows batch;
  const float* row_lse;
  const float* row_scale;
  T* grad;  ///< chunk rows × grad_ld; may be z.logits when T is float
  index_t grad_ld;
  RowTransform transform{};  ///< kExtended only
  /// The chunk holds vocabulary columns [col_begin, col_begin + cols) only (a block of
  /// strategy vocab_blocks, or a rank's vocabulary slice): z.logits and grad hold those
  /// columns, z.bias (when given) their bias, and a target t is column t − col_begin;
  /// z.vocab stays the whole vocabulary (targets past it are out of range). cols 0 means
  /// every column of z.vocab.
  index_t col_begin = 0;
  index_t cols = 0;
};

/// Four gradient values of type T, stored at once (8 bytes for bf16/half).
template <class T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

/// logit_gradient() for the four columns base..base+3.
template <bool kExtended>
KTO_HOST_DEVICE inline void quad_gradient(float4 z, index_t base, index_t target, float lse,
                                          float scale, const RowTransform& transform,
                                          float (&out)[4]) {
  const float x[4] = {z.x, z.y, z.z, z.w};
  KTO_UNROLL()
  for (int k = 0; k < 4; ++k)
    out[k] = logit_gradient<kExtended>(x[k], base + k, target, lse, scale, transform);
}

template <class T, int kThreads, bool kExtended = false>
KTO_HOST_DEVICE inline void write_chunk_row(const float* row, const float* bias, T* out,
                                            index_t vocab, index_t target, float lse, float scale,
                                            int lane, bool zero,
                                            const RowTransform& transform = {}) {
  const index_t vectors = vocab / 4;
  const float4* z4 = reinterpret_cast<const float4*>(row);
  const float4* b4 = reinterpret_cast<const float4*>(bias);
  Quad<T>* o4 = reinterpret_cast<Quad<T>*>(out);
  KTO_UNROLL(4)
  for (index_t i = lane; i < vectors; i += kThreads) {
    float g[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (!zero) {
      float4 z = z4[i];
      if (bias) {
        const float4 b = b4[i];
        z.x += b.x, z.y += b.y, z.z += b.z, z.w += b.w;
      }
      quad_gradient<kExtended>(z, i * 4, target, lse, scale, transform, g);
    }
    Quad<T> q;
    KTO_UNROLL()
    for (int k = 0; k < 4; ++k) q.v[k] = from_float<T>(g[k]);
    o4[i] = q;
  }
  for (index_t v = vectors * 4 + lane; v < vocab; v += kThreads) {
    float g = 0.0f;
    if (!zero) {
      const float x = row[v] + (bias ? bias[v] : 0.0f);
      g = logit_gradient<kExtended>(x, v, target, lse, scale, transform);
    }
    out[v] = from_float<T>(g);
  }
}

/// What lane `lane` of chunk row i's group writes: dZ over the row's columns (or its block's).
template <class T, int kThreads, bool kExtended>
KTO_HOST_DEVICE inline void chunk_backward_row(const ChunkBackwardParams<T>& p, index_t i,
                                               int lane) {
  const index_t r = p.z.batch_row(i);
  const index_t t = p.batch.target(r);
  const float scale = p.row_scale[r];
  const bool scored = t != p.batch.ignore_index && t >= 0 && t < p.z.vocab && scale != 0.0f;
  const float lse = scored ? p.row_lse[r] : 0.0f;
  // In a block, the target's column relative to it (outside [0, cols): no one-hot here).
  write_chunk_row<T, kThreads, kExtended>(p.z.logits + i * p.z.ld, p.z.bias, p.grad + i * p.grad_ld,
                                          p.cols ? p.cols : p.z.vocab, t - p.col_begin, lse, scale,
                                          lane, !scored, p.transform);
}

template <class T, int kThreads, int kRowsPerBlock, bool kExtended>
__global__ void __launch_bounds__(kThreads* kRowsPerBlock)
    chunk_backward_kernel(ChunkBackwardParams<T> p) {
  const int lane = static_cast<int>(threadIdx.x) % kThreads;
  const index_t i = static_cast<index_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreads;
  if (i >= p.z.rows) return;
  chunk_backward_row<T, kThreads, kExtended>(p, i, lane);
}

/// Copies elements [first, cols) step `step` of a hidden row, or writes zeros
/// when the row is not scored: the GEMMs then never read an ignored row's
/// values, so a NaN there (prompt, padding) cannot reach dW or dH.
template <class T>
KTO_HOST_DEVICE inline void masked_row_copy(const T* in, T* out, index_t cols, index_t first,
                                            index_t step, bool scored) {
  for (index_t k = first; k < cols; k += step) out[k] = scored ? in[k] : from_float<T>(0.0f);
}

/// Chunk row i (`cols` apart in `out`) = hidden row `view.batch_row(i)` if scored, else zeros
/// (with compact scoring every chunk row is scored).
template <class T>
__global__ void gather_scored_rows_kernel(const T* hidden, index_t ld, index_t cols,
                                          BatchRows batch, ChunkView view, T* out) {
  for (index_t i = blockIdx.x; i < view.rows; i += gridDim.x) {
    const index_t r = view.batch_row(i);
    masked_row_copy(hidden + r * ld, out + i * cols, cols, threadIdx.x, blockDim.x,
                    batch.target(r) != batch.ignore_index);
  }
}

/// d_hidden row view.batch_row(i) = chunk row i of `in` (`cols` apart): the compact
/// chunk's dH back in the batch's rows (each batch row belongs to one chunk row).
__global__ void scatter_rows_kernel(const float* in, index_t cols, ChunkView view, float* out,
                                    index_t ld) {
  for (index_t i = blockIdx.x; i < view.rows; i += gridDim.x) {
    const float* src = in + i * cols;
    float* dst = out + view.batch_row(i) * ld;
    for (index_t k = threadIdx.x; k < cols; k += blockDim.x) dst[k] = src[k];
  }
}

/// Threads of compact_rows_kernel (one block).
constexpr int kCompactThreads = 1024;

/// The rows thread `t` of kCompactThreads owns: a contiguous segment [begin, end).
KTO_HOST_DEVICE inline void compact_segment(index_t rows, int t, index_t& begin, index_t& end) {
  const index_t per = (rows + kCompactThreads - 1) / kCompactThreads;
  begin = per * t < rows ? per * t : rows;
  end = begin + per < rows ? begin + per : rows;
}

/// Scored rows of thread t's segment.
KTO_HOST_DEVICE inline index_t count_scored(const BatchRows& batch, index_t begin, index_t end) {
  index_t n = 0;
  for (index_t r = begin; r < end; ++r) n += batch.target(r) != batch.ignore_index;
  return n;
}

/// Writes the scored rows of [begin, end), in order, from position `first` of row_of
/// (`capacity` entries: none past it).
KTO_HOST_DEVICE inline void write_scored(const BatchRows& batch, index_t begin, index_t end,
                                         index_t first, index_t* row_of, index_t capacity) {
  for (index_t r = begin; r < end; ++r) {
    if (batch.target(r) == batch.ignore_index) continue;
    if (first < capacity) row_of[first] = r;
    ++first;
  }
}

/// row_of[i] = the batch's i-th scored row, in row order (compact scoring); one block of
/// kCompactThreads, each a contiguous segment, an exclusive scan of their counts in between
/// (a fixed order: the same map every run). `expected`: the count the host planned with
/// from host_targets (row_of's size). A different count is reported, and the map stays
/// memory-safe: nothing past `expected`, and entries the device has no row for are row 0
/// (the host counted M <= rows scored rows, so rows >= 1 when M >= 1).
__global__ void __launch_bounds__(kCompactThreads)
    compact_rows_kernel(BatchRows batch, index_t* row_of, index_t expected, DeviceErrors* errors,
                        unsigned error_tag) {
  __shared__ index_t first[kCompactThreads];
  const int t = static_cast<int>(threadIdx.x);
  index_t begin, end;
  compact_segment(batch.rows, t, begin, end);
  first[t] = count_scored(batch, begin, end);
  __syncthreads();
  if (t == 0) {
    index_t run = 0;
    for (int k = 0; k < kCompactThreads; ++k) {
      const index_t n = first[k];
      first[k] = run;
      run += n;
    }
    if (run != expected) record_error(errors, run, kHostTargetsMismatch | error_tag);
    for (index_t i = run; i < expected; ++i) row_of[i] = 0;
  }
  __syncthreads();
  write_scored(batch, begin, end, first[t], row_of, expected);
}

/// out[i] = float(in[i]) (the bias), or 1 when in is null (the ones of the db product).
template <class T, class U>
__global__ void convert_kernel(const T* in, U* out, index_t n) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    out[i] = in ? from_float<U>(to_float(in[i])) : from_float<U>(1.0f);
}

}  // namespace device
}  // namespace kto
