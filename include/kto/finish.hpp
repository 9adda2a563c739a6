// finish.hpp — from sequence log-probs to loss, metrics and g_s (host).
//
// The batch-level part of a KTO step, after the logits have been reduced to one
// log-prob per sequence:
//
//   KL batch   → kl_partial()  → (S, C)  → [caller all-reduces] → z0
//   target set → finish()      → ρ_s, βρ_s, loss_s, g_s = ∂L/∂logp_s, metrics
//
// O(sequences) work in double, in index order, so it is deterministic. The
// per-example formulas are example_loss.hpp's, the same ones the CUDA finish
// kernel calls.
#pragma once

#include <cstdint>
#include <vector>

#include "example_loss.hpp"
#include "layout.hpp"
#include "metrics.hpp"
#include "options.hpp"
#include "reference_point.hpp"
#include "validate.hpp"

namespace kto {

/// Local (S, C) over a KL batch: ρ_j = policy_logp[j] − reference_logp[j].
/// `num_tokens` is needed only for KlEstimator::nonempty_mean (may be empty otherwise).
template <class Acc>
KlPartial kl_partial(Span<const Acc> policy_logp, Span<const Acc> reference_logp,
                     Span<const index_t> num_tokens, const Options& o) {
  const char* fn = "kto::kl_partial";
  validate_options(o, fn);
  const index_t n = policy_logp.size;
  detail::validate_span(policy_logp, n, fn, "kl_policy_logp");
  detail::validate_span(reference_logp, n, fn, "kl_reference_logp");
  if (o.kl_estimator == KlEstimator::nonempty_mean) {
    detail::validate_span(num_tokens, n, fn, "kl_num_tokens");
  } else if (num_tokens.size != 0) {
    detail::validate_span(num_tokens, n, fn, "kl_num_tokens");
  }
  detail::validate_finite(policy_logp, fn, "kl_policy_logp");
  detail::validate_finite(reference_logp, fn, "kl_reference_logp");
  KlPartial p;
  for (index_t j = 0; j < n; ++j) {
    const index_t tokens = num_tokens.size ? num_tokens[j] : 1;
    add_kl_example(p, static_cast<double>(policy_logp[j]) - static_cast<double>(reference_logp[j]),
                   tokens, o.kl_estimator);
  }
  return p;
}

/// Per-example outputs of a step, in the accumulation type.
template <class Acc>
struct ExampleOutputs {
  std::vector<Acc> ratio;      ///< ρ_s
  std::vector<Acc> reward;     ///< βρ_s
  std::vector<Acc> loss;       ///< λ f(u_s), before the reduction
  std::vector<Acc> grad_logp;  ///< g_s = ∂L/∂logp_s
};

template <class Acc>
struct FinishResult {
  Metrics metrics;
  ExampleOutputs<Acc> examples;
};

/// Loss, metrics and g_s for the target batch, given the all-reduced KL partial.
template <class Acc>
FinishResult<Acc> finish(const KlPartial& kl, Span<const Acc> policy_logp,
                         Span<const Acc> reference_logp, Span<const std::uint8_t> desirable,
                         const Options& o) {
  const char* fn = "kto::finish";
  validate_options(o, fn);
  const index_t n = policy_logp.size;
  detail::require(n >= 1, fn, "policy_logp.size", "be >= 1 (an empty batch has no loss)", n);
  detail::validate_span(policy_logp, n, fn, "policy_logp");
  detail::validate_span(reference_logp, n, fn, "reference_logp");
  detail::validate_span(desirable, n, fn, "desirable");
  detail::validate_finite(policy_logp, fn, "policy_logp");
  detail::validate_finite(reference_logp, fn, "reference_logp");
  detail::validate_labels(desirable, fn, "desirable");
  detail::require(std::isfinite(kl.sum) && std::isfinite(kl.count) && kl.count >= 0, fn, "kl",
                  "hold a finite sum and a count >= 0", kl.sum);

  const double z0 = reference_point(kl, o);
  const double scale = reduction_scale(o, n);
  FinishResult<Acc> out;
  auto& ex = out.examples;
  const auto un = static_cast<size_t>(n);
  ex.ratio.resize(un);
  ex.reward.resize(un);
  ex.loss.resize(un);
  ex.grad_logp.resize(un);
  MetricSums sums;
  for (index_t s = 0; s < n; ++s) {
    const double logp = static_cast<double>(policy_logp[s]);
    const double rho = logp - static_cast<double>(reference_logp[s]);
    const bool d = desirable[s] != 0;
    const ExampleTerms t = example_terms(rho, d, z0, o, scale);
    const auto i = static_cast<size_t>(s);
    ex.ratio[i] = static_cast<Acc>(rho);
    ex.reward[i] = static_cast<Acc>(t.reward);
    ex.loss[i] = static_cast<Acc>(t.loss);
    ex.grad_logp[i] = static_cast<Acc>(t.grad_logp);
    sums.add(d, t.loss, t.reward, logp);
  }
  out.metrics = finalize(sums, z0, scale);
  return out;
}

}  // namespace kto
