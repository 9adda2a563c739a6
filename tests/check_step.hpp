// check_step.hpp — run the CPU step on a stored problem and compare every
// output with the float64 reference under the tolerance rule of support.hpp.
#pragma once

#include "support.hpp"

namespace test {

template <class T>
struct StepCase {
  Stored<T> st;
  std::vector<kto::accumulator_t<T>> ref_logp, kl_policy, kl_reference;
  std::vector<index_t> kl_tokens;
  std::vector<uint8_t> desirable;
};

/// Random labels (or all one side), reference and KL log-probs near the policy's.
template <class T>
StepCase<T> make_step_case(std::mt19937_64& rng, Layout layout, const ShapeSpec& spec,
                           const kto::Options& o, int label_mode = -1) {
  using Acc = kto::accumulator_t<T>;
  StepCase<T> c{make_problem<T>(rng, layout, spec, o.ignore_index), {}, {}, {}, {}, {}};
  const ref::Forward f = ref::forward(c.st.problem, o.ignore_index, o.average_logprob);
  std::normal_distribution<double> noise(0.0, 1.5 / o.beta * 0.1);
  std::bernoulli_distribution coin(0.4);
  const index_t B = c.st.problem.num_sequences();
  for (index_t s = 0; s < B; ++s) {
    c.ref_logp.push_back(static_cast<Acc>(f.logp[s] + noise(rng)));
    c.desirable.push_back(label_mode < 0 ? uint8_t(coin(rng)) : uint8_t(label_mode));
  }
  const index_t K = B + 1;
  std::uniform_int_distribution<index_t> tok(0, 9);
  std::normal_distribution<double> lp(-20.0, 5.0);
  for (index_t j = 0; j < K; ++j) {
    const index_t n = j == 0 ? 0 : tok(rng);
    const double pol = n == 0 ? 0.0 : lp(rng);
    c.kl_policy.push_back(static_cast<Acc>(pol));
    c.kl_reference.push_back(static_cast<Acc>(n == 0 ? 0.0 : pol - noise(rng) - 0.3));
    c.kl_tokens.push_back(n);
  }
  return c;
}

template <class T>
kto::cpu::StepInputs<T> step_inputs(const StepCase<T>& c) {
  kto::cpu::StepInputs<T> in;
  in.policy_logits = c.st.logits;
  in.targets = c.st.targets;
  in.sequences = c.st.sequences();
  in.reference_logp = kto::make_span(c.ref_logp);
  in.desirable = kto::make_span(c.desirable);
  in.kl = {kto::make_span(c.kl_policy), kto::make_span(c.kl_reference),
           kto::make_span(c.kl_tokens)};
  return in;
}

template <class T>
ref::Step reference_step(const StepCase<T>& c, const kto::Options& o) {
  std::vector<double> ref_logp(c.ref_logp.begin(), c.ref_logp.end());
  std::vector<double> kl_rho;
  for (size_t j = 0; j < c.kl_policy.size(); ++j)
    kl_rho.push_back(double(c.kl_policy[j]) - double(c.kl_reference[j]));
  return ref::step(c.st.problem, ref_logp, c.desirable, kl_rho, c.kl_tokens, o);
}

/// Runs kto_step (out of place or in place) and checks loss, metrics,
/// per-sequence values and every gradient element.
template <class T>
void check_step(const StepCase<T>& c, const kto::Options& o, bool in_place,
                const kto::cpu::ExecutionPolicy& exec = {}) {
  const double tol = rtol<T>();
  const ref::Problem& p = c.st.problem;
  const ref::Step want = reference_step(c, o);

  std::vector<T> storage = in_place ? c.st.buffer : c.st.poisoned_like();
  kto::cpu::StepInputs<T> in = step_inputs(c);
  if (in_place) in.policy_logits.data = storage.data();
  const auto got = kto::cpu::kto_step<T>(in, o, c.st.view_over(storage), exec);

  const index_t B = p.num_sequences();
  // Condition scale of each sequence: Σ |ℓ_r| + |lse_r| over its scored rows.
  std::vector<double> seq_scale(B, 1.0);
  for (index_t s = 0; s < B; ++s) {
    double a = 0;
    for (index_t r = p.offsets[s]; r < p.offsets[s + 1]; ++r)
      if (p.targets[r] != o.ignore_index)
        a += std::fabs(want.fwd.token_logp[r]) + std::fabs(want.fwd.lse[r]);
    if (o.average_logprob && want.fwd.num_tokens[s] > 0) a /= double(want.fwd.num_tokens[s]);
    seq_scale[s] = std::max(1.0, a + std::fabs(double(c.ref_logp[s])));
  }
  const double lam = std::max({o.desirable_weight, o.undesirable_weight, 1.0});
  const double denom = o.reduction == kto::Reduction::sum ? 1.0
                       : o.mean_denominator > 0           ? double(o.mean_denominator)
                                                          : double(B);
  double mean_scale = 0;
  for (double s : seq_scale) mean_scale = std::max(mean_scale, s);

  for (index_t s = 0; s < B; ++s) {
    INFO("sequence " << s);
    CHECK(got.num_tokens[s] == want.fwd.num_tokens[s]);
    KTO_CHECK_CLOSE(got.logp[s], want.fwd.logp[s], seq_scale[s], tol);
    KTO_CHECK_CLOSE(got.examples.ratio[s], want.rho[s], seq_scale[s], tol);
    KTO_CHECK_CLOSE(got.examples.reward[s], want.reward[s], o.beta * seq_scale[s], tol);
    KTO_CHECK_CLOSE(got.examples.loss[s], want.loss_s[s], lam * o.beta * seq_scale[s], tol);
    KTO_CHECK_CLOSE(got.examples.grad_logp[s], want.g[s],
                    lam * o.beta * o.beta * seq_scale[s] / denom, tol);
  }
  const auto& m = got.metrics;
  KTO_CHECK_CLOSE(m.kl, want.z0, 1.0, tol);
  KTO_CHECK_CLOSE(m.loss, want.loss, lam * o.beta * mean_scale, tol);
  KTO_CHECK_CLOSE(m.rewards_chosen, want.rewards_chosen, o.beta * mean_scale, tol);
  KTO_CHECK_CLOSE(m.rewards_rejected, want.rewards_rejected, o.beta * mean_scale, tol);
  KTO_CHECK_CLOSE(m.rewards_margins, want.margins, o.beta * mean_scale, tol);
  KTO_CHECK_CLOSE(m.logps_chosen, want.logps_chosen, mean_scale, tol);
  KTO_CHECK_CLOSE(m.logps_rejected, want.logps_rejected, mean_scale, tol);
  CHECK(m.count_chosen == want.n_chosen);
  CHECK(m.count_rejected == want.n_rejected);

  // Every gradient element, against ∂L/∂Z of the reference.
  const double u = unit_roundoff<T>();
  index_t bad = 0;
  for (index_t r = 0; r < p.rows; ++r) {
    index_t s = -1;
    for (index_t q = 0; q < B; ++q)
      if (r >= p.offsets[q] && r < p.offsets[q + 1]) s = q;
    const bool scored = s >= 0 && p.targets[r] != o.ignore_index;
    const double c_r = scored && o.average_logprob ? 1.0 / want.fwd.num_tokens[s] : 1.0;
    const double row_scale = scored
                                 ? std::fabs(want.g[s]) * c_r * (1.0 + std::fabs(want.fwd.lse[r])) +
                                       c_r * lam * o.beta * o.beta * seq_scale[s] / denom
                                 : 0.0;
    for (index_t v = 0; v < p.vocab; ++v) {
      const double g = grad_at(c.st, storage, r, v);
      const double w = want.grad[r * p.vocab + v];
      const bool ok = std::fabs(g - w) <= tol * row_scale + u * std::fabs(w) && !std::isnan(g);
      if (!ok && bad++ < 5) {
        INFO("grad row " << r << " col " << v << " got " << g << " want " << w << " row_scale "
                         << row_scale);
        CHECK(ok);
      }
    }
  }
  CHECK(bad == 0);
  // Storage outside the view (row padding) is never written.
  if (!in_place) {
    std::vector<char> touched(storage.size(), 0);
    for (index_t r = 0; r < p.rows; ++r)
      for (index_t v = 0; v < p.vocab; ++v)
        touched[static_cast<size_t>(c.st.logits.rows.offset(r) + v)] = 1;
    index_t written_padding = 0;
    for (size_t i = 0; i < storage.size(); ++i)
      if (!touched[i] && !std::isnan(upcast(storage[i]))) ++written_padding;
    CHECK(written_padding == 0);
  }
}

}  // namespace test
