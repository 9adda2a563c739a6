// fused_fixture.hpp — fused-linear test helpers shared by the test programs:
// problems stored in a type, one run against poisoned gradients, and a small
// valid step (FusedFixture) that each error test breaks in one place.
#pragma once

#include <memory>

#include <kto/cpu/fused_linear.hpp>

#include "fused_problem.hpp"
#include "support.hpp"

namespace {

using kto::index_t;
using kto::cpu::FusedStrategy;
using test::expect_error;
using test::FusedObserved;
using test::FusedProblem;

template <class T>
double round_to(double x) {
  return test::upcast(test::to_type<T>(x));
}

template <class T>
test::FusedProblem make_problem(std::mt19937_64& rng, const test::FusedSpec& spec) {
  return test::make_fused_problem(rng, spec, round_to<T>);
}

/// A problem stored in type T (exactly: its values are already rounded to T). With
/// `pad`, the hidden states' and the weight's rows are dim + pad elements apart, the
/// padding NaN (the library must never read it).
template <class T>
struct Storage {
  using Acc = kto::accumulator_t<T>;
  const FusedProblem& fp;
  index_t stride;
  std::vector<T> hidden, weight, bias, kl_hidden;
  std::vector<Acc> reference_logp, kl_reference_logp;
  explicit Storage(const FusedProblem& p, index_t pad = 0) : fp(p), stride(p.dim + pad) {
    auto to = [&](const std::vector<double>& v, bool rows) {
      if (!rows) {
        std::vector<T> out;
        for (double x : v) out.push_back(test::to_type<T>(x));
        return out;
      }
      const auto n = static_cast<index_t>(v.size()) / p.dim;
      std::vector<T> out(static_cast<size_t>(n * stride),
                         test::to_type<T>(std::numeric_limits<double>::quiet_NaN()));
      for (index_t r = 0; r < n; ++r)
        for (index_t d = 0; d < p.dim; ++d)
          out[static_cast<size_t>(r * stride + d)] = test::to_type<T>(v[r * p.dim + d]);
      return out;
    };
    hidden = to(p.hidden, true);
    weight = to(p.weight, true);
    bias = to(p.bias, false);
    kl_hidden = to(p.kl_hidden, true);
    reference_logp.assign(p.reference_logp.begin(), p.reference_logp.end());
    kl_reference_logp.assign(p.kl_reference_logp.begin(), p.kl_reference_logp.end());
  }
  kto::LinearHead<T> head() const {
    kto::LinearHead<T> h;
    h.weight = kto::matrix_view<const T>(weight.data(), fp.vocab, fp.dim, stride);
    if (fp.with_bias) h.bias = kto::make_span(bias);
    return h;
  }
  kto::cpu::FusedLinearInputs<T> inputs() const {
    kto::cpu::FusedLinearInputs<T> in;
    in.hidden = kto::matrix_view<const T>(hidden.data(), fp.rows, fp.dim, stride);
    in.targets = kto::targets_vector(fp.targets.data(), fp.rows);
    in.sequences = kto::sequences(fp.offsets.data(), static_cast<index_t>(fp.offsets.size()) - 1);
    in.reference_logp = kto::reference_logp(reference_logp);
    in.desirable = kto::make_span(fp.desirable);
    in.kl.hidden = kto::matrix_view<const T>(kl_hidden.data(), fp.kl_rows, fp.dim, stride);
    in.kl.targets = kto::targets_vector(fp.kl_targets.data(), fp.kl_rows);
    in.kl.sequences =
        kto::sequences(fp.kl_offsets.data(), static_cast<index_t>(fp.kl_offsets.size()) - 1);
    in.kl.reference_logp = kto::reference_logp(kl_reference_logp);
    return in;
  }
};

template <class T>
struct Run {
  using Acc = kto::accumulator_t<T>;
  kto::cpu::StepResult<Acc> result;
  std::vector<Acc> d_hidden, d_weight, d_bias;
};

template <class T>
Run<T> run_fused(const FusedProblem& fp, const kto::Options& o,
                 const kto::cpu::FusedLinearConfig& cfg, const kto::cpu::ExecutionPolicy& exec = {},
                 const kto::LinearHead<T>* head_override = nullptr,
                 const kto::cpu::FusedLinearHooks<kto::accumulator_t<T>>& hooks = {},
                 index_t pad = 0) {
  using Acc = kto::accumulator_t<T>;
  const Storage<T> st(fp, pad);
  const kto::LinearHead<T> head = head_override ? *head_override : st.head();
  const index_t V = head.weight.rows, D = fp.dim;
  Run<T> run;
  const Acc poison = std::numeric_limits<Acc>::quiet_NaN();
  run.d_hidden.assign(static_cast<size_t>(fp.rows * D), poison);
  run.d_weight.assign(static_cast<size_t>(V * D), poison);
  run.d_bias.assign(static_cast<size_t>(V), poison);
  kto::cpu::LinearGradients<Acc> g;
  g.d_hidden = kto::matrix_view(run.d_hidden.data(), fp.rows, D);
  g.d_weight = kto::matrix_view(run.d_weight.data(), V, D);
  g.d_bias = kto::make_span(run.d_bias.data(), V);
  run.result = kto::cpu::fused_linear_kto_step<T>(st.inputs(), head, o, g, cfg, exec, hooks);
  return run;
}

template <class T>
FusedObserved observe(const Run<T>& run) {
  FusedObserved obs;
  const auto& r = run.result;
  obs.examples.metrics = r.metrics;
  obs.examples.num_tokens = r.num_tokens;
  obs.examples.logp.assign(r.logp.begin(), r.logp.end());
  obs.examples.ratio.assign(r.examples.ratio.begin(), r.examples.ratio.end());
  obs.examples.reward.assign(r.examples.reward.begin(), r.examples.reward.end());
  obs.examples.loss.assign(r.examples.loss.begin(), r.examples.loss.end());
  obs.examples.grad_logp.assign(r.examples.grad_logp.begin(), r.examples.grad_logp.end());
  obs.d_hidden.assign(run.d_hidden.begin(), run.d_hidden.end());
  obs.d_weight.assign(run.d_weight.begin(), run.d_weight.end());
  obs.d_bias.assign(run.d_bias.begin(), run.d_bias.end());
  return obs;
}

/// A budget of `rows` chunk rows for this problem's head.
template <class T>
kto::cpu::FusedLinearConfig config_rows(const FusedProblem& fp, index_t rows,
                                        FusedStrategy strategy) {
  kto::cpu::FusedLinearConfig cfg;
  size_t per_row = sizeof(kto::accumulator_t<T>) * static_cast<size_t>(fp.vocab + fp.dim);
  if (kto::cpu::uses_bf16_gemm<T>(cfg)) per_row += sizeof(T) * static_cast<size_t>(fp.dim);
  cfg.chunk_bytes = static_cast<size_t>(rows) * per_row;
  cfg.strategy = strategy;
  return cfg;
}

}  // namespace

namespace {

/// A small valid fused step that each test breaks in one place.
struct FusedFixture {
  FusedProblem fp;
  std::unique_ptr<Storage<float>> st;
  kto::LinearHead<float> head;
  kto::cpu::FusedLinearInputs<float> in;
  kto::Options o;
  std::vector<float> dh, dw, db;
  kto::cpu::LinearGradients<float> grads;
  kto::cpu::FusedLinearHooks<float> hooks;
  FusedFixture() {
    std::mt19937_64 rng(7);
    fp = make_problem<float>(rng, test::FusedSpec{});
    restore();
    dh.resize(static_cast<size_t>(fp.rows * fp.dim));
    dw.resize(static_cast<size_t>(fp.vocab * fp.dim));
    db.resize(static_cast<size_t>(fp.vocab));
    grads.d_hidden = kto::matrix_view(dh.data(), fp.rows, fp.dim);
    grads.d_weight = kto::matrix_view(dw.data(), fp.vocab, fp.dim);
    grads.d_bias = kto::make_span(db.data(), fp.vocab);
  }
  /// Re-stores fp after a test edited it.
  void restore() {
    st = std::make_unique<Storage<float>>(fp);
    head = st->head();
    in = st->inputs();
  }
  void run() { kto::cpu::fused_linear_kto_step<float>(in, head, o, grads, {}, {}, hooks); }
};

}  // namespace
