// example_loss.hpp — the loss of one example and its derivative w.r.t. logp.
//
// With ρ = logp(policy) − logp(reference), u = β(ρ − z0) for a desirable and
// u = β(z0 − ρ) for an undesirable example, and weight λ = λ_D or λ_U:
//
//   loss = λ f(u),        f(u) = 1 − σ(u)   or   −log σ(u)
//   g    = ∂(scale · loss)/∂logp = scale · λ f'(u) · (±β)
//          f'(u) = −σ'(u)  (1 − σ)        f'(u) = −σ(−u)  (−log σ)
//
// so a desirable kto example has g = −(λ_D/B) β σ'(u), an undesirable one
// g = +(λ_U/B) β σ'(u) (scale = 1/B for the mean reduction). z0 is detached:
// it carries no gradient. The reward TRL logs is βρ.
#pragma once

#include "config.hpp"
#include "options.hpp"
#include "sigmoid.hpp"

namespace kto {

struct ExampleTerms {
  double loss;       ///< λ f(u), before the batch reduction
  double grad_logp;  ///< g = ∂L_batch/∂logp_policy (includes the reduction's scale)
  double reward;     ///< βρ
};

/// `scale` is 1/denominator for the mean reduction and 1 for sum.
KTO_HOST_DEVICE inline ExampleTerms example_terms(double rho, bool desirable, double z0,
                                                  const Options& o, double scale) {
  const double weight = desirable ? o.desirable_weight : o.undesirable_weight;
  const double du_drho = desirable ? o.beta : -o.beta;
  const double u = du_drho * (rho - z0);
  double f, df;
  if (o.link == Link::neg_log_sigmoid) {
    f = neg_log_sigmoid(u);
    df = -sigmoid(-u);
  } else {
    f = sigmoid(-u);
    df = -sigmoid_derivative(u);
  }
  ExampleTerms t;
  t.loss = weight * f;
  t.grad_logp = scale * weight * df * du_drho;
  t.reward = o.beta * rho;
  return t;
}

/// The largest |g| example_terms() returns for an example, whatever ρ and z0:
/// scale · λ · β · max|f'|, with max|f'| = 1/4 (σ', at u = 0) for 1 − σ and 1
/// (σ(−u) < 1) for −log σ. What a step can bound before z0 is known.
KTO_HOST_DEVICE inline double grad_logp_bound(bool desirable, const Options& o, double scale) {
  const double weight = desirable ? o.desirable_weight : o.undesirable_weight;
  const double slope = o.link == Link::neg_log_sigmoid ? 1.0 : 0.25;
  return scale * weight * o.beta * slope;
}

/// g_s c_r, the scale of every scored row's gradient in sequence s: c_r = 1
/// (summed log-probs) or 1/n_s (average_logprob). One home for the CPU paths
/// and the kernels.
KTO_HOST_DEVICE inline double token_scale(double grad_logp, index_t num_tokens, bool average) {
  const double c = average && num_tokens > 0 ? 1.0 / static_cast<double>(num_tokens) : 1.0;
  return grad_logp * c;
}

/// Multiplier of the batch reduction: 1/denominator (mean) or 1 (sum).
KTO_HOST_DEVICE inline double reduction_scale(const Options& o, index_t num_examples) {
  if (o.reduction == Reduction::sum) return 1.0;
  const index_t d = o.mean_denominator > 0 ? o.mean_denominator : num_examples;
  return d > 0 ? 1.0 / static_cast<double>(d) : 0.0;
}

}  // namespace kto
