// reference_point.hpp — the KL estimate z0 that KTO measures rewards against.
//
//   z0 = max(0, S / C),  S = Σ_j ρ_j over the KL examples,  C = their count
//
// (C counts every KL example for the `mean` estimator, only those with at least
// one scored token for `nonempty_mean`). z0 is detached: no gradient flows into
// the KL batch. In data parallel each rank computes its local (S, C), the
// caller sums both across ranks with one all-reduce of two doubles, and only
// then divides and clamps — the global estimate, not a mean of clamped means.
// With equal per-rank counts this equals TRL's mean of per-rank means.
#pragma once

#include "config.hpp"
#include "options.hpp"

namespace kto {

/// Local partial sums of the KL estimate, and how many ranks failed before the
/// all-reduce. Three contiguous doubles, so `allreduce(&partial.sum, 3, SUM)`
/// reduces them at once; a failing rank still joins the collective with
/// failures = 1, so every rank learns of it and none waits forever.
struct KlPartial {
  double sum = 0.0;
  double count = 0.0;
  double failures = 0.0;
};

KTO_HOST_DEVICE inline void add_kl_example(KlPartial& p, double rho, index_t num_tokens,
                                           KlEstimator estimator) {
  if (estimator == KlEstimator::mean || num_tokens > 0) {
    p.sum += rho;
    p.count += 1.0;
  }
}

KTO_HOST_DEVICE inline KlPartial merge(KlPartial a, const KlPartial& b) {
  a.sum += b.sum;
  a.count += b.count;
  a.failures += b.failures;
  return a;
}

/// z0 from the (already all-reduced) partial. C = 0 gives S/C := 0.
KTO_HOST_DEVICE inline double reference_point(const KlPartial& p, const Options& o) {
  if (o.loss_type == LossType::apo_zero_unpaired) return 0.0;
  if (o.reference_point == ReferencePoint::zero) return 0.0;
  if (o.reference_point == ReferencePoint::fixed) return o.fixed_z0;
  const double z = p.count > 0.0 ? p.sum / p.count : 0.0;
  return (o.clamp_kl && !(z > 0.0)) ? 0.0 : z;
}

}  // namespace kto
