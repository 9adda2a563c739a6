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
#pragma once

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
KTO_HOST_DEVICE inline void lse_update(LseState& st, const float (&x)[N]) {
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

/// Butterfly over the 32 lanes in a fixed pattern: deterministic; lane 0 holds the result.
__device__ __forceinline__ LseState warp_reduce_lse(LseState st) {
  KTO_UNROLL()
  for (int offset = 16; offset > 0; offset >>= 1) {
    LseState other;
    other.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    st = lse_combine(st, other);
  }
  return st;
}

/// Reduction over a group of kThreads threads: one warp, or the whole block
/// (kThreads == blockDim.x, a multiple of 32). The result is valid in lane 0
/// of the group. Every thread of a block-wide group must call it.
template <int kThreads>
__device__ __forceinline__ LseState group_reduce_lse(LseState st) {
  st = warp_reduce_lse(st);
  if constexpr (kThreads > 32) {
    constexpr int kWarps = kThreads / 32;
    __shared__ LseState partial[kWarps];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = st;
    __syncthreads();
    if (warp == 0) {
      st = lane < kWarps ? partial[lane] : lse_identity();
      st = warp_reduce_lse(st);
    }
  }
  return st;
}

}  // namespace device
}  // namespace kto
