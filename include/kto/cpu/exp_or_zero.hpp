// cpu/exp_or_zero.hpp — a vectorised exp that is exactly 0 where a probability is.
//
// Eigen's packet exp clamps its argument (to about −88.7 in float), so exp(−inf)
// and exp(−FLT_MAX) come out as ~3e-39, not 0, at some packet widths (SSE2, AVX2,
// NEON) and 0 at others (AVX-512). A masked logit (−inf, or Hugging Face's
// finfo.min) would then get a tiny gradient, and its entropy term e·(z − m) would
// be e·lowest ≈ −1 instead of 0. exp_or_zero flushes every result below the
// smallest normal number to 0, on every ISA, in the packet and the scalar path:
//
//   exp_or_zero(x) = 0        where x < log(numeric_limits<Acc>::min())
//                  = exp(x)   elsewhere (the same bits as Eigen's exp)
//
// Dropping terms below FLT_MIN (DBL_MIN) from a sum whose largest term is 1
// changes nothing representable. NaN is passed to exp unchanged; callers that
// must report NaN find it first (row_kernels.hpp uses a NaN-propagating max).
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <limits>

namespace kto {
namespace cpu {

/// log of the smallest normal Acc: exp below it is flushed to 0.
template <class Acc>
inline Acc exp_flush_threshold() {
  static const Acc threshold = std::log(std::numeric_limits<Acc>::min());
  return threshold;
}

template <class Acc>
struct ExpOrZeroOp {
  Acc threshold = exp_flush_threshold<Acc>();
  Acc operator()(const Acc& x) const { return x < threshold ? Acc(0) : std::exp(x); }
  template <class Packet>
  Packet packetOp(const Packet& x) const {
    namespace in = Eigen::internal;
    return in::pandnot(in::pexp(x), in::pcmp_lt(x, in::pset1<Packet>(threshold)));
  }
};

/// exp_or_zero of every coefficient of an Eigen array expression.
template <class Derived>
inline auto exp_or_zero(const Eigen::ArrayBase<Derived>& x) {
  return x.unaryExpr(ExpOrZeroOp<typename Derived::Scalar>());
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
}  // namespace internal
}  // namespace Eigen
