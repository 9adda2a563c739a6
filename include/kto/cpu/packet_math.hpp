// cpu/packet_math.hpp — Eigen's vectorised exp and tanh, made exact where they saturate.
//
// Eigen's packet functions approximate on a clamped argument, and the clamp differs by
// packet width (SSE2, AVX2, AVX-512, NEON). Where the true result is an exact 0 or ±1,
// they may return a neighbour instead, and the loss would depend on the ISA:
//
//   exp(−inf), exp(−FLT_MAX): 0 at AVX-512, ~3e-39 at other widths. A masked logit (−inf,
//     or Hugging Face's finfo.min) would get a tiny gradient, and its entropy term
//     e·(z − m) would be e·lowest ≈ −1 instead of 0.
//   tanh(±inf): ±1 on x86, a neighbour of ±1 on NEON (seen under qemu). A soft-capped
//     logit far out would get a gradient k·(1 − th²) ≈ 1e-7 where the true one is 0.
//
//   exp_or_zero(x)     = 0 where x < log(numeric_limits<Acc>::min()), else exp(x)
//   saturating_tanh(x) = ±1 where |x| ≥ 10 (float; 20 for double), else tanh(x)
//
// Dropping terms below FLT_MIN (DBL_MIN) from a sum whose largest term is 1, or rounding
// tanh to ±1 where 1 − |tanh| < 2^-27 (2^-57), changes nothing representable. Both hold
// in the packet path and the scalar (tail) path. NaN is passed to exp and tanh
// unchanged; callers that must report NaN find it first (row_kernels.hpp uses a
// NaN-propagating max).
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <limits>

namespace kto {
namespace cpu {

/// log of the smallest normal Acc, 2^(min_exponent − 1): exp below it is flushed to 0.
template <class Acc>
constexpr Acc exp_flush_threshold() {
  return static_cast<Acc>((std::numeric_limits<Acc>::min_exponent - 1) * 0.69314718055994531);
}

template <class Acc>
struct ExpOrZeroOp {
  Acc operator()(const Acc& x) const {
    return x < exp_flush_threshold<Acc>() ? Acc(0) : std::exp(x);
  }
  template <class Packet>
  Packet packetOp(const Packet& x) const {
    namespace in = Eigen::internal;
    return in::pandnot(in::pexp(x), in::pcmp_lt(x, in::pset1<Packet>(exp_flush_threshold<Acc>())));
  }
};

/// exp_or_zero of every coefficient of an Eigen array expression.
template <class Derived>
inline auto exp_or_zero(const Eigen::ArrayBase<Derived>& x) {
  return x.unaryExpr(ExpOrZeroOp<typename Derived::Scalar>());
}

/// |x| from which tanh(x) is ±1 to within 2^-27 (float) or 2^-57 (double).
template <class Acc>
constexpr Acc tanh_saturation() {
  return sizeof(Acc) == sizeof(float) ? Acc(10) : Acc(20);
}

template <class Acc>
struct SaturatingTanhOp {
  Acc operator()(const Acc& x) const {
    return std::fabs(x) >= tanh_saturation<Acc>() ? std::copysign(Acc(1), x) : std::tanh(x);
  }
  template <class Packet>
  Packet packetOp(const Packet& x) const {
    namespace in = Eigen::internal;
    const Packet one = in::pset1<Packet>(Acc(1));
    const Packet sign_one = in::pselect(in::pcmp_lt(x, in::pzero(x)), in::pnegate(one), one);
    const Packet saturated = in::pcmp_le(in::pset1<Packet>(tanh_saturation<Acc>()), in::pabs(x));
    return in::pselect(saturated, sign_one, in::ptanh(x));
  }
};

/// saturating_tanh of every coefficient of an Eigen array expression.
template <class Derived>
inline auto saturating_tanh(const Eigen::ArrayBase<Derived>& x) {
  return x.unaryExpr(SaturatingTanhOp<typename Derived::Scalar>());
}

}  // namespace cpu
}  // namespace kto

namespace Eigen {
namespace internal {
template <class Acc>
struct functor_traits<kto::cpu::ExpOrZeroOp<Acc>> {
  enum {
    Cost = functor_traits<scalar_exp_op<Acc>>::Cost + 2 * NumTraits<Acc>::AddCost,
    // pcmp_lt and pandnot exist for every float/double packet (NEON leaves HasCmp unset).
    PacketAccess = packet_traits<Acc>::HasExp
  };
};
template <class Acc>
struct functor_traits<kto::cpu::SaturatingTanhOp<Acc>> {
  enum {
    Cost = functor_traits<scalar_tanh_op<Acc>>::Cost + 4 * NumTraits<Acc>::AddCost,
    PacketAccess = packet_traits<Acc>::HasTanh
  };
};
}  // namespace internal
}  // namespace Eigen
