// sigmoid.hpp — σ and its relatives, stable for any finite argument.
//
//   σ(u)      = 1 / (1 + e^−u)      computed from e^−|u| ≤ 1 so nothing overflows
//   1 − σ(u)  = σ(−u)               (no cancellation near σ = 1)
//   −log σ(u) = softplus(−u) = max(−u, 0) + log1p(e^−|u|)
//   σ'(u)     = σ(u) σ(−u)          (even in u)
//
// These run on the host and inside CUDA kernels alike.
#pragma once

#include <math.h>

#include "config.hpp"

namespace kto {
namespace detail {
KTO_HOST_DEVICE inline float exp_of(float x) {
  return ::expf(x);
}
KTO_HOST_DEVICE inline double exp_of(double x) {
  return ::exp(x);
}
KTO_HOST_DEVICE inline float log1p_of(float x) {
  return ::log1pf(x);
}
KTO_HOST_DEVICE inline double log1p_of(double x) {
  return ::log1p(x);
}
}  // namespace detail

template <class R>
KTO_HOST_DEVICE inline R sigmoid(R u) {
  const R e = detail::exp_of(u >= R(0) ? -u : u);  // e^−|u| in (0, 1]
  return u >= R(0) ? R(1) / (R(1) + e) : e / (R(1) + e);
}

/// −log σ(u), without forming σ(u).
template <class R>
KTO_HOST_DEVICE inline R neg_log_sigmoid(R u) {
  const R a = u >= R(0) ? u : -u;
  return (u >= R(0) ? R(0) : -u) + detail::log1p_of(detail::exp_of(-a));
}

/// σ'(u) = σ(u)(1 − σ(u)).
template <class R>
KTO_HOST_DEVICE inline R sigmoid_derivative(R u) {
  return sigmoid(u) * sigmoid(-u);
}

}  // namespace kto
