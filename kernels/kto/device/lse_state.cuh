// lse_state.cuh — online log-sum-exp: per thread, per warp, per block.
//
// A state (m, s) stands for Σ exp(x − m) = s over the values seen, m their max.
// Two states combine as m = max(m1, m2), s = s1·e^(m1−m) + s2·e^(m2−m), which
// is exact algebra, so threads can each fold a strided part of the row and the
// states can be merged in any fixed tree: the reduction order is fixed by the
// code, never by timing, and the result is bit-identical run to run.
//
// Non-finite inputs must survive to the end so the row can be reported:
// a NaN makes s NaN; +inf makes m = +inf and e^(inf − inf) = NaN; a row of
// only −inf leaves m = −inf, s = 0, so lse = −inf. fmaxf drops NaNs from the
// max, hence the explicit NaN check when the max is still −inf.
//
// StatisticsState adds the token statistics' sums (../token_statistics.hpp):
// w = Σ e^(x−m)·(x − m) and t = Σ x / V (each term scaled, so that finfo.min masks
// cannot overflow it), w rescaled with s when the max rises, so a
// row's entropy and mean logit come from the same read as its lse. The
// kernels use it only when the caller asked for statistics or a transform.
#pragma once

#include <float.h>
#include <math.h>

#include <kto/config.hpp>

namespace kto {
namespace device {

struct LseState {
  float m;
  float s;
};

KTO_HOST_DEVICE inline LseState lse_identity() {
  return LseState{-INFINITY, 0.0f};
}

/// Folds n values (n small, unrolled by the caller's constant) into the state.
KTO_HOST_DEVICE inline bool is_nan(float x) {
  return x != x;
}

template <int N>
KTO_HOST_DEVICE inline void lse_update(LseState& st, const float (&x)[N], float /*inv_vocab*/) {
  float chunk_max = x[0];
  KTO_UNROLL()
  for (int k = 1; k < N; ++k) chunk_max = fmaxf(chunk_max, x[k]);
  const float m = fmaxf(st.m, chunk_max);
  if (m == -INFINITY) {  // only −inf (and maybe NaN) so far: exp terms are 0
    KTO_UNROLL()
    for (int k = 0; k < N; ++k)
      if (is_nan(x[k])) st.s = NAN;
    return;
  }
  float s = st.s * expf(st.m - m);
  KTO_UNROLL()
  for (int k = 0; k < N; ++k) s += expf(x[k] - m);
  st.m = m;
  st.s = s;
}

KTO_HOST_DEVICE inline LseState lse_combine(const LseState& a, const LseState& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return LseState{m, a.s + b.s};  // 0 + 0, or NaN kept
  return LseState{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

/// (m, s) and the statistics' sums w, t.
struct StatisticsState {
  float m;
  float s;
  float w;  ///< Σ e^(x−m)·(x − m)
  float t;  ///< Σ x / V
};

KTO_HOST_DEVICE inline StatisticsState statistics_identity() {
  return StatisticsState{-INFINITY, 0.0f, 0.0f, 0.0f};
}

/// w after the max moves from m to m_new (≥ m): e^(m−m_new)·(w + (m − m_new)·s).
/// An empty state (s = 0, m = −inf) stays 0 rather than 0·(−inf).
KTO_HOST_DEVICE inline float rescaled_w(const StatisticsState& st, float m_new, float factor) {
  return st.s > 0.0f ? factor * (st.w + (st.m - m_new) * st.s) : 0.0f;
}

/// `inv_vocab` = 1 / V of the row (t's weight); LseState's overload ignores it.
template <int N>
KTO_HOST_DEVICE inline void lse_update(StatisticsState& st, const float (&x)[N], float inv_vocab) {
  float chunk_max = x[0];
  KTO_UNROLL()
  for (int k = 0; k < N; ++k) {
    if (k > 0) chunk_max = fmaxf(chunk_max, x[k]);
    st.t += x[k] * inv_vocab;
  }
  const float m = fmaxf(st.m, chunk_max);
  if (m == -INFINITY) {
    KTO_UNROLL()
    for (int k = 0; k < N; ++k)
      if (is_nan(x[k])) st.s = NAN;
    return;
  }
  const float factor = expf(st.m - m);
  float w = rescaled_w(st, m, factor);
  float s = st.s * factor;
  KTO_UNROLL()
  for (int k = 0; k < N; ++k) {
    const float d = x[k] - m;
    const float e = expf(d);
    s += e;
    // IEEE expf is exactly 0 for a masked logit (−inf or finfo.min: d < −104); its
    // d is clamped so that the term is 0, not 0·(−inf).
    w += e * fmaxf(d, -FLT_MAX);
  }
  st.m = m;
  st.s = s;
  st.w = w;
}

KTO_HOST_DEVICE inline StatisticsState lse_combine(const StatisticsState& a,
                                                   const StatisticsState& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return StatisticsState{m, a.s + b.s, 0.0f, a.t + b.t};
  const float fa = expf(a.m - m), fb = expf(b.m - m);
  return StatisticsState{m, a.s * fa + b.s * fb, rescaled_w(a, m, fa) + rescaled_w(b, m, fb),
                         a.t + b.t};
}

template <class State>
KTO_HOST_DEVICE inline State identity_of();
template <>
KTO_HOST_DEVICE inline LseState identity_of<LseState>() {
  return lse_identity();
}
template <>
KTO_HOST_DEVICE inline StatisticsState identity_of<StatisticsState>() {
  return statistics_identity();
}

__device__ __forceinline__ LseState shuffle_xor(const LseState& st, int offset) {
  return LseState{__shfl_xor_sync(0xffffffffu, st.m, offset),
                  __shfl_xor_sync(0xffffffffu, st.s, offset)};
}

__device__ __forceinline__ StatisticsState shuffle_xor(const StatisticsState& st, int offset) {
  return StatisticsState{
      __shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset),
      __shfl_xor_sync(0xffffffffu, st.w, offset), __shfl_xor_sync(0xffffffffu, st.t, offset)};
}

/// Butterfly over the 32 lanes in a fixed pattern: deterministic; lane 0 holds the result.
template <class State>
__device__ __forceinline__ State warp_reduce_lse(State st) {
  KTO_UNROLL()
  for (int offset = 16; offset > 0; offset >>= 1) st = lse_combine(st, shuffle_xor(st, offset));
  return st;
}

/// Reduction over a group of kThreads threads: one warp, or the whole block
/// (kThreads == blockDim.x, a multiple of 32). The result is valid in lane 0
/// of the group. Every thread of a block-wide group must call it.
template <int kThreads, class State>
__device__ __forceinline__ State group_reduce_lse(State st) {
  st = warp_reduce_lse(st);
  if constexpr (kThreads > 32) {
    constexpr int kWarps = kThreads / 32;
    __shared__ State partial[kWarps];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = st;
    __syncthreads();
    if (warp == 0) {
      st = lane < kWarps ? partial[lane] : identity_of<State>();
      st = warp_reduce_lse(st);
    }
  }
  return st;
}

}  // namespace device
}  // namespace kto
