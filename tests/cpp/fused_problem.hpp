// fused_problem.hpp — random fused-linear problems and their float64 reference.
//
// A problem is hidden states H (N × D), an lm_head W (V × D) and bias b, the
// target rows/offsets of problem.hpp's packed plan, and a KL batch. The
// reference materialises Z = H Wᵀ + b in float64 from the upcast stored values,
// runs reference.hpp's step on it and maps ∂L/∂Z back:
//   dH = dZ W,  dW = dZᵀ H,  db = Σ_r dZ[r, :].
// Tolerance rule (support.hpp's, carried through one product): an element of
// dH is compared within rtol · Σ_v rowscale_r |W[v, k]|, of dW within
// rtol · Σ_r rowscale_r |H[r, k]|, of db within rtol · Σ_r rowscale_r, where
// rowscale_r is the condition scale of ∂L/∂Z[r, ·] (ExampleScales::row).
// Where dZ is rounded to a narrower type before the products (the GPU's bf16
// and half GEMMs), that type's unit roundoff u_grad adds to rtol: each dZ
// element is off by at most u_grad |dZ| ≤ u_grad rowscale_r.
#pragma once

#include <kto/fused_linear.hpp>

#include <functional>

#include "compare.hpp"
#include "problem.hpp"

namespace test {

/// Values are doubles already rounded to the storage type (so storing them
/// is exact); the tests convert them to the type under test.
struct FusedProblem {
  index_t rows = 0, dim = 0, vocab = 0, kl_rows = 0;
  std::vector<double> hidden, weight, bias, kl_hidden;
  std::vector<index_t> targets, offsets, kl_targets, kl_offsets;
  std::vector<double> reference_logp, kl_reference_logp;  // exact in float
  std::vector<std::uint8_t> desirable;
  bool with_bias = true;

  /// Z = H Wᵀ + b in float64 over the given hidden rows.
  ref::Problem logits(const std::vector<double>& h, index_t n, const std::vector<index_t>& tg,
                      const std::vector<index_t>& off) const {
    ref::Problem p;
    p.rows = n;
    p.vocab = vocab;
    p.targets = tg;
    p.offsets = off;
    p.logits.assign(static_cast<size_t>(n * vocab), 0.0);
    for (index_t r = 0; r < n; ++r)
      for (index_t v = 0; v < vocab; ++v) {
        double z = with_bias ? bias[v] : 0.0;
        for (index_t k = 0; k < dim; ++k) z += h[r * dim + k] * weight[v * dim + k];
        p.logits[r * vocab + v] = z;
      }
    return p;
  }
  ref::Problem target_problem() const { return logits(hidden, rows, targets, offsets); }
  ref::Problem kl_problem() const { return logits(kl_hidden, kl_rows, kl_targets, kl_offsets); }
};

struct FusedSpec {
  index_t sequences = 5, max_len = 6, dim = 16, vocab = 37, kl_sequences = 4;
  double ignore_fraction = 0.2;
};

/// `round(x)`: the nearest value of the storage type.
inline FusedProblem make_fused_problem(std::mt19937_64& rng, const FusedSpec& spec,
                                       const std::function<double(double)>& round) {
  FusedProblem fp;
  fp.dim = spec.dim;
  fp.vocab = spec.vocab;
  ShapeSpec shape;
  shape.sequences = spec.sequences;
  shape.max_len = spec.max_len;
  shape.vocab = spec.vocab;
  shape.ignore_fraction = spec.ignore_fraction;
  const Plan plan = make_plan(rng, Layout::packed, shape, -100, round);
  fp.rows = plan.problem.rows;
  fp.targets = plan.problem.targets;
  fp.offsets = plan.problem.offsets;
  shape.sequences = spec.kl_sequences;
  const Plan kl = make_plan(rng, Layout::packed, shape, -100, round);
  fp.kl_rows = kl.problem.rows;
  fp.kl_targets = kl.problem.targets;
  fp.kl_offsets = kl.problem.offsets;

  std::normal_distribution<double> normal(0.0, 1.0);
  const double w_scale = 2.0 / std::sqrt(static_cast<double>(spec.dim));  // logits ~ N(0, 4)
  auto fill = [&](std::vector<double>& v, index_t n, double scale) {
    v.resize(static_cast<size_t>(n));
    for (auto& x : v) x = round(scale * normal(rng));
  };
  fill(fp.hidden, fp.rows * fp.dim, 1.0);
  fill(fp.kl_hidden, fp.kl_rows * fp.dim, 1.0);
  fill(fp.weight, fp.vocab * fp.dim, w_scale);
  fill(fp.bias, fp.vocab, 0.5);
  std::uniform_int_distribution<int> coin(0, 1);
  for (index_t s = 0; s < spec.sequences; ++s) {
    fp.reference_logp.push_back(static_cast<float>(-8.0 + normal(rng)));
    fp.desirable.push_back(static_cast<std::uint8_t>(coin(rng)));
  }
  for (index_t s = 0; s < spec.kl_sequences; ++s)
    fp.kl_reference_logp.push_back(static_cast<float>(-8.0 + normal(rng)));
  return fp;
}

/// Gradients of the float64 reference, and its step.
struct FusedReference {
  ref::Problem problem;
  ref::Step step;
  std::vector<double> reference_logp;
  std::vector<double> d_hidden, d_weight, d_bias;
  double z0_scale = 1.0;
};

/// With a logit transform in `o`, the step runs on Z' = f(Z) and the gradients
/// carry ∂z'/∂z (chain rule, in float64).
inline FusedReference fused_reference(const FusedProblem& fp, const kto::Options& o) {
  FusedReference R;
  const ref::Problem raw = fp.target_problem();
  R.problem = ref::transformed(raw, o);
  const ref::Problem kl = ref::transformed(fp.kl_problem(), o);
  const ref::Forward kf = ref::forward(kl, o.ignore_index, o.average_logprob);
  std::vector<double> kl_rho;
  for (size_t j = 0; j < kf.logp.size(); ++j)
    kl_rho.push_back(kf.logp[j] - fp.kl_reference_logp[j]);
  R.reference_logp = fp.reference_logp;
  R.step = ref::step(R.problem, R.reference_logp, fp.desirable, kl_rho, kf.num_tokens, o);
  R.z0_scale = kto::uses_kl_batch(o) ? kl_condition_scale(kl, o) : 1.0;
  const index_t N = fp.rows, D = fp.dim, V = fp.vocab;
  R.d_hidden.assign(static_cast<size_t>(N * D), 0.0);
  R.d_weight.assign(static_cast<size_t>(V * D), 0.0);
  R.d_bias.assign(static_cast<size_t>(V), 0.0);
  for (index_t r = 0; r < N; ++r)
    for (index_t v = 0; v < V; ++v) {
      const double g =
          R.step.grad[r * V + v] * ref::transform_derivative(raw.logits[r * V + v], o.logit_scale,
                                                             o.logit_softcap, o.temperature);
      if (g == 0.0) continue;
      R.d_bias[v] += g;
      for (index_t k = 0; k < D; ++k) {
        R.d_hidden[r * D + k] += g * fp.weight[v * D + k];
        R.d_weight[v * D + k] += g * fp.hidden[r * D + k];
      }
    }
  return R;
}

/// What a fused step returned, upcast.
struct FusedObserved {
  Observed examples;
  std::vector<double> d_hidden, d_weight, d_bias;
};

/// Checks every output against the reference under the rule above.
inline void compare_fused(const FusedProblem& fp, const FusedReference& R, const FusedObserved& got,
                          const kto::Options& o, double rtol, index_t vocab_begin = 0,
                          index_t vocab_count = -1, double u_grad = 0.0) {
  const ExampleScales sc =
      compare_examples(R.problem, R.reference_logp, R.step, got.examples, o, rtol, R.z0_scale);
  const index_t N = fp.rows, D = fp.dim;
  const index_t V = vocab_count < 0 ? fp.vocab : vocab_count;
  std::vector<double> row_scale(static_cast<size_t>(N));
  // ∂L/∂z = ∂L/∂z' · ∂z'/∂z, and |∂z'/∂z| ≤ |a|/τ: an error in ∂L/∂z' grows by at most that.
  const double slope = std::max(1.0, std::fabs(o.logit_scale) / o.temperature);
  for (index_t r = 0; r < N; ++r) row_scale[r] = slope * sc.row(R.problem, R.step, o, r);
  index_t bad = 0;
  auto check = [&](const char* what, index_t i, double g, double w, double scale) {
    const bool ok = std::fabs(g - w) <= (rtol + u_grad) * scale && !std::isnan(g);
    if (!ok && bad++ < 5) {
      INFO(what << "[" << i << "] got " << g << " want " << w << " scale " << scale);
      CHECK(ok);
    }
  };
  for (index_t r = 0; r < N; ++r)
    for (index_t k = 0; k < D; ++k) {
      double scale = 0;
      for (index_t v = 0; v < fp.vocab; ++v)
        scale += row_scale[r] * std::fabs(fp.weight[v * D + k]);
      check("d_hidden", r * D + k, got.d_hidden[r * D + k], R.d_hidden[r * D + k], scale);
    }
  for (index_t v = 0; v < V; ++v) {
    const index_t gv = vocab_begin + v;
    double bscale = 0;
    for (index_t r = 0; r < N; ++r) bscale += row_scale[r];
    if (!got.d_bias.empty()) check("d_bias", gv, got.d_bias[v], R.d_bias[gv], bscale);
    for (index_t k = 0; k < D; ++k) {
      double scale = 0;
      for (index_t r = 0; r < N; ++r) scale += row_scale[r] * std::fabs(fp.hidden[r * D + k]);
      if (!got.d_weight.empty())  // empty: a frozen head (no dW asked for)
        check("d_weight", gv * D + k, got.d_weight[v * D + k], R.d_weight[gv * D + k], scale);
    }
  }
  CHECK(bad == 0);
}

}  // namespace test
