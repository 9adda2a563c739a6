// cpu/row_kernels.hpp — the two per-row primitives, vectorised with Eigen.
//
// Forward, one read of the row:  lse = m + log Σ_v exp(z_v − m),  target logit.
//   The row streams through an L1-sized fp32 (fp64 for double) buffer in chunks;
//   the running max m and sum s are rescaled when a chunk raises the max
//   (online log-sum-exp), so a 128K-vocab row is read exactly once.
// Token statistics (entropy, mean logit; token_statistics.hpp) from the same read, on request.
// Backward, one read and one write:  out_v = scale · (1[v = t] − exp(z_v − lse)).
//   The chunk is converted before it is written, so out may alias the row (in place).
// Every exp is exp_or_zero and every tanh saturating_tanh (packet_math.hpp): a masked
// logit's p, and a saturated soft-cap's derivative, are exactly 0 on every ISA.
//
// Chunks are copied to an aligned buffer first: Eigen's reductions then see the
// same alignment whatever the caller's pointer, so the summation order, and the
// result bits, depend on the values alone.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>

#include "../config.hpp"
#include "../logit_transform.hpp"
#include "../token_statistics.hpp"
#include "convert.hpp"
#include "packet_math.hpp"

namespace kto {
namespace cpu {

constexpr index_t kRowChunk = 2048;

template <class Acc>
struct RowStats {
  Acc lse;
  Acc target_logit;
};

namespace detail {

template <class Acc>
using AlignedChunk = Eigen::Map<Eigen::Array<Acc, Eigen::Dynamic, 1>, Eigen::Aligned64>;

template <class T, class Acc>
inline void load_chunk(const T* src, index_t n, Acc* buf) {
  widen(src, n, buf);
}

template <class T, class Acc>
inline void store_chunk(const Acc* buf, index_t n, T* dst) {
  narrow(buf, n, dst);
}

/// z ← z' in place (logit_transform.hpp), vectorised.
template <class Acc>
inline void transform_chunk(AlignedChunk<Acc>& chunk, const LogitTransform& t) {
  if (!t.capped()) {
    chunk *= static_cast<Acc>(t.scale / t.temperature);
  } else {
    chunk = saturating_tanh(chunk * static_cast<Acc>(t.scale / t.softcap)) *
            static_cast<Acc>(t.softcap / t.temperature);
  }
}

}  // namespace detail

namespace detail {

/// One read of a row: lse and the target logit, and with kStatistics the
/// token statistics' sums (token_statistics.hpp).
///
/// Non-finite logits, the same on every ISA: a −inf (or any logit whose exp is
/// below the smallest normal) adds exactly 0 to s and w (packet_math.hpp); a NaN
/// is found by a NaN-propagating max and makes lse NaN; +inf makes lse NaN too.
template <bool kStatistics, class T, class Acc>
inline RowStats<Acc> row_pass(const T* row, index_t vocab, index_t target,
                              TokenStatistics<Acc>* statistics, const LogitTransform& transform) {
  const bool transformed = !transform.identity();
  alignas(64) Acc buf[kRowChunk];
  alignas(64) Acc exp_buf[kStatistics ? kRowChunk : 1];
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  const Acc inv_vocab = Acc(1) / static_cast<Acc>(vocab);
  Acc m = neg_inf;
  Acc s = Acc(0);
  Acc w = Acc(0);  // Σ e^(z−m) (z − m)
  Acc t = Acc(0);  // Σ z / V, term by term so that finfo.min masks cannot overflow it
  for (index_t begin = 0; begin < vocab; begin += kRowChunk) {
    const index_t n = std::min(kRowChunk, vocab - begin);
    load_chunk(row + begin, n, buf);
    AlignedChunk<Acc> chunk(buf, n);
    if (transformed) transform_chunk(chunk, transform);
    const Acc chunk_max = chunk.template maxCoeff<Eigen::PropagateNaN>();
    if constexpr (kStatistics) t += (chunk * inv_vocab).sum();
    if (!(chunk_max < std::numeric_limits<Acc>::infinity())) {  // NaN or +inf: lse is NaN
      m = chunk_max;
      s = std::numeric_limits<Acc>::quiet_NaN();
      break;
    }
    if (chunk_max == neg_inf) continue;  // every term is exactly 0
    if (chunk_max > m) {
      const Acc rescale = std::exp(m - chunk_max);
      if constexpr (kStatistics) w = s > Acc(0) ? rescale * (w + (m - chunk_max) * s) : Acc(0);
      s *= rescale;
      m = chunk_max;
    }
    if constexpr (kStatistics) {
      chunk -= m;  // d = z − m, once for both sums (t has read z above)
      AlignedChunk<Acc> e(exp_buf, n);
      e = exp_or_zero(chunk);
      s += e.sum();
      // A masked logit has e = 0 exactly; its d (−inf, or huge) is clamped to the
      // lowest finite value so that the term is 0, not 0·(−inf) = NaN.
      w += (e * chunk.max(std::numeric_limits<Acc>::lowest())).sum();
    } else {
      s += exp_or_zero(chunk - m).sum();
    }
  }
  if constexpr (kStatistics) *statistics = token_statistics(s, w, t);
  const Acc target_logit = static_cast<Acc>(row[target]);
  return RowStats<Acc>{m + std::log(s),
                       transformed ? transform_logit(target_logit, transform) : target_logit};
}

}  // namespace detail

/// lse of one row and its logit at `target` (target must be in [0, vocab)).
/// A NaN or +inf anywhere, or a row of only −inf, yields a non-finite lse.
/// With a `transform`, of the transformed row (logit_transform.hpp).
template <class T, class Acc = accumulator_t<T>>
inline RowStats<Acc> row_stats(const T* row, index_t vocab, index_t target,
                               const LogitTransform& transform = {}) {
  return detail::row_pass<false, T, Acc>(row, vocab, target, nullptr, transform);
}

/// row_stats(), and the row's entropy and mean logit from the same read.
template <class T, class Acc = accumulator_t<T>>
inline RowStats<Acc> row_stats(const T* row, index_t vocab, index_t target,
                               TokenStatistics<Acc>& statistics,
                               const LogitTransform& transform = {}) {
  return detail::row_pass<true, T, Acc>(row, vocab, target, &statistics, transform);
}

/// out[v] = scale · (1[v = target] − exp(z'_v − lse)) · ∂z'_v/∂z_v, with z' the
/// transformed row (the identity by default) and lse its lse; out may equal row.
template <class T, class Acc>
inline void row_gradient(const T* row, index_t vocab, index_t target, Acc lse, Acc scale, T* out,
                         const LogitTransform& transform = {}) {
  alignas(64) Acc buf[kRowChunk];
  alignas(64) Acc tanh_buf[kRowChunk];
  const Acc k = static_cast<Acc>(transform.scale / transform.temperature);
  for (index_t begin = 0; begin < vocab; begin += kRowChunk) {
    const index_t n = std::min(kRowChunk, vocab - begin);
    detail::load_chunk(row + begin, n, buf);
    detail::AlignedChunk<Acc> chunk(buf, n);
    if (transform.identity()) {
      chunk = exp_or_zero(chunk - lse) * (-scale);
      if (target >= begin && target < begin + n) buf[target - begin] += scale;
    } else if (!transform.capped()) {  // z' = k z, ∂z'/∂z = k
      chunk = exp_or_zero(chunk * k - lse) * (-scale * k);
      if (target >= begin && target < begin + n) buf[target - begin] += scale * k;
    } else {  // z' = (c/τ) tanh(a z / c), ∂z'/∂z = k (1 − tanh²)
      detail::AlignedChunk<Acc> th(tanh_buf, n);
      th = saturating_tanh(chunk * static_cast<Acc>(transform.scale / transform.softcap));
      const Acc cap = static_cast<Acc>(transform.softcap / transform.temperature);
      chunk = exp_or_zero(th * cap - lse) * (-scale);
      if (target >= begin && target < begin + n) buf[target - begin] += scale;
      chunk *= (Acc(1) - th.square()) * k;
    }
    detail::store_chunk(buf, n, out + begin);
  }
}

template <class T>
inline void zero_row(T* out, index_t vocab) {
  std::fill(out, out + vocab, T(0));
}

}  // namespace cpu
}  // namespace kto
