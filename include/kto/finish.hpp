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
#include "model_logp.hpp"
#include "options.hpp"
#include "reference_point.hpp"
#include "validate.hpp"

namespace kto {

namespace detail {

/// kl_partial() as called by the public entry point `fn` (named in errors).
template <class Acc>
KlPartial kl_partial_impl(Span<const Acc> policy_logp, Span<const Acc> reference_logp,
                          Span<const index_t> num_tokens, const Options& o, const char* fn) {
  validate_options(o, fn);
  const index_t n = policy_logp.size;
  require(n >= 0, fn, "kl.policy_logp.size", "be >= 0", n);
  detail::validate_span(policy_logp, n, fn, "kl.policy_logp");
  detail::validate_span(reference_logp, n, fn, "kl.reference_logp");
  if (o.kl_estimator == KlEstimator::nonempty_mean) {
    detail::validate_span(num_tokens, n, fn, "kl.num_tokens");
  } else if (num_tokens.size != 0) {
    detail::validate_span(num_tokens, n, fn, "kl.num_tokens");
  }
  detail::validate_logprobs(policy_logp, fn, "kl.policy_logp");
  detail::validate_logprobs(reference_logp, fn, "kl.reference_logp");
  for (index_t j = 0; j < num_tokens.size; ++j)
    if (num_tokens[j] < 0)
      fail(fn, "kl.num_tokens[" + std::to_string(j) + "]", "be >= 0", num_tokens[j]);
  KlPartial p;
  for (index_t j = 0; j < n; ++j) {
    const index_t tokens = num_tokens.size ? num_tokens[j] : 1;
    add_kl_example(p, static_cast<double>(policy_logp[j]) - static_cast<double>(reference_logp[j]),
                   tokens, o.kl_estimator);
  }
  return p;
}

}  // namespace detail

/// Local (S, C) over a KL batch: ρ_j = policy_logp[j] − reference_logp[j].
/// `num_tokens` is needed only for KlEstimator::nonempty_mean (may be empty otherwise).
template <class Acc>
KlPartial kl_partial(PolicyLogp<Acc> policy_logp, ReferenceLogp<Acc> reference_logp,
                     Span<const index_t> num_tokens, const Options& o) {
  return detail::kl_partial_impl(policy_logp, reference_logp, num_tokens, o, "kto::kl_partial");
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

namespace detail {

/// Checks finish()'s per-example inputs: what a step can check before its collective.
template <class Acc>
void validate_finish_inputs(index_t n, Span<const Acc> reference_logp,
                            Span<const std::uint8_t> desirable, const Options& o, const char* fn,
                            const char* count_name) {
  validate_options(o, fn);
  require(n >= 1, fn, count_name, "be >= 1 (an empty batch has no loss)", n);
  validate_span(reference_logp, n, fn, "reference_logp");
  validate_span(desirable, n, fn, "desirable");
  validate_logprobs(reference_logp, fn, "reference_logp");
  validate_labels(desirable, fn, "desirable");
}

/// Checks the all-reduced KL partial; with `o`, also that a step estimating z0 from a
/// KL batch has one (z0 would silently be 0 otherwise).
inline void validate_kl_partial(const KlPartial& kl, const char* fn, const Options* o = nullptr) {
  require(std::isfinite(kl.sum), fn, "kl.sum", "be finite (an all-reduced sum of log-ratios)",
          kl.sum);
  // A sum of example counts is a whole number: 0, or at least 1 (so S/C is finite).
  require(std::isfinite(kl.count) && kl.count >= 0 && kl.count == std::floor(kl.count), fn,
          "kl.count", "be finite and >= 0 and whole (an all-reduced example count)", kl.count);
  require(o == nullptr || !uses_kl_batch(*o) || kl.count >= 1, fn, "kl.count",
          "be >= 1 with options.reference_point kl_batch: give a KL batch with at least one "
          "example (on some rank), or choose reference_point zero or fixed",
          kl.count);
}

/// finish() as called by the public entry point `fn`.
template <class Acc>
FinishResult<Acc> finish_impl(const KlPartial& kl, Span<const Acc> policy_logp,
                              Span<const Acc> reference_logp, Span<const std::uint8_t> desirable,
                              const Options& o, const char* fn,
                              const char* count_name = "policy_logp.size") {
  const index_t n = policy_logp.size;
  validate_finish_inputs(n, reference_logp, desirable, o, fn, count_name);
  validate_span(policy_logp, n, fn, "policy_logp");
  validate_logprobs(policy_logp, fn, "policy_logp");
  validate_kl_partial(kl, fn, &o);

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

}  // namespace detail

/// Loss, metrics and g_s for the target batch, given the all-reduced KL partial.
template <class Acc>
FinishResult<Acc> finish(const KlPartial& kl, PolicyLogp<Acc> policy_logp,
                         ReferenceLogp<Acc> reference_logp, Span<const std::uint8_t> desirable,
                         const Options& o) {
  return detail::finish_impl(kl, policy_logp, reference_logp, desirable, o, "kto::finish");
}

}  // namespace kto
