// check_step.hpp — run the CPU step on a stored problem and compare every
// output with the float64 reference under the tolerance rule of support.hpp.
#pragma once

#include "compare.hpp"
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
  in.reference_logp = kto::reference_logp(c.ref_logp);
  in.desirable = kto::make_span(c.desirable);
  in.kl = {kto::policy_logp(c.kl_policy), kto::reference_logp(c.kl_reference),
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

/// A step's metrics and per-sequence outputs, for compare_examples() (the gradient
/// accessor is the caller's).
template <class Acc>
Observed observed(const kto::cpu::StepResult<Acc>& got) {
  Observed obs;
  obs.metrics = got.metrics;
  obs.num_tokens = got.num_tokens;
  obs.logp.assign(got.logp.begin(), got.logp.end());
  obs.ratio.assign(got.examples.ratio.begin(), got.examples.ratio.end());
  obs.reward.assign(got.examples.reward.begin(), got.examples.reward.end());
  obs.loss.assign(got.examples.loss.begin(), got.examples.loss.end());
  obs.grad_logp.assign(got.examples.grad_logp.begin(), got.examples.grad_logp.end());
  return obs;
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
  if (want.empty_kl) {
    expect_error([&] { kto::cpu::kto_step<T>(in, o, c.st.view_over(storage), exec); }, "kl.count",
                 "be >= 1 with options.reference_point kl_batch", "0");
    return;
  }
  const auto got = kto::cpu::kto_step<T>(in, o, c.st.view_over(storage), exec);

  Observed obs = observed(got);
  obs.grad = [&](index_t r, index_t v) { return grad_at(c.st, storage, r, v); };
  std::vector<double> reference_logp(c.ref_logp.begin(), c.ref_logp.end());
  compare_step(p, reference_logp, want, obs, o, tol, unit_roundoff<T>());
  // Storage outside the view (row padding) is never written.
  if (!in_place)
    CHECK(written_padding(storage, c.st.logits.rows, p.vocab, [](T x) { return upcast(x); }) == 0);
}

}  // namespace test
