// Logit transforms (logit_transform.hpp): scale, soft-cap and temperature as options on every
// CPU path. Three independent checks:
//   1. the float64 path with a transform has the gradient central finite differences give
//      (h = 1e-6: error ~1e-9 relative, checked at 1e-6);
//   2. the float32 logits path with a transform equals the float64 path run on logits
//      transformed by the test (z' = c·tanh(a z / c) / τ written here), its gradient the
//      chain rule (∂z'/∂z written here) applied to that path's gradient;
//   3. the fused step with a transform equals 2 on logits = hidden·Wᵀ + b formed in float64.
// Tolerance (docs/math.md §7): fp32 accumulation, rtol 1e-5 of max(|want|, scale): a sequence
// log-prob's scale is Σ (|z'_t| + |lse'|) over its rows, a gradient element's the largest
// |∂L/∂z| of its row plus |g_s c_r| max(1, |a| / τ) (1 + |lse'_r| + max_v |z'_rv|): e^(z' − lse')
// is rounded relative to |z'| + |lse'|, and ∂z'/∂z ≤ |a| / τ carries it (the fused step adds
// Σ_d |h_d W_vd| to each logit's magnitude through one product: × D-fold rtol).
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

#include <kto/cpu.hpp>

#include "problem.hpp"

namespace {

using kto::index_t;

double f(double z, const kto::LogitTransform& t) {
  return ref::transform(z, t.scale, t.softcap, t.temperature);
}
double df(double z, const kto::LogitTransform& t) {
  return ref::transform_derivative(z, t.scale, t.softcap, t.temperature);
}

struct Problem {
  index_t N = 10, V = 37, B = 3;
  std::vector<index_t> targets, offsets = {0, 4, 7, 10};
  std::vector<double> ref_logp = {-30.0, -25.0, -28.0};
  std::vector<std::uint8_t> desirable = {1, 0, 1};
  explicit Problem(std::mt19937_64& rng, index_t vocab = 37) : V(vocab) {
    std::uniform_int_distribution<index_t> tok(0, V - 1);
    for (index_t r = 0; r < N; ++r) targets.push_back(r % 4 == 0 ? -100 : tok(rng));
  }
  kto::Options options(const kto::LogitTransform& t) const {
    kto::Options o;
    o.beta = 0.5;
    o.reference_point = kto::ReferencePoint::fixed;
    o.fixed_z0 = 0.3;
    o.logit_scale = t.scale;
    o.logit_softcap = t.softcap;
    o.temperature = t.temperature;
    return o;
  }
  /// Loss, logp and ∂L/∂z of the logits path on (N × V) logits of type T.
  template <class T>
  kto::cpu::StepResult<kto::accumulator_t<T>> step(std::vector<T>& z, const kto::Options& o,
                                                   std::vector<T>& grad) const {
    using A = kto::accumulator_t<T>;
    static thread_local std::vector<A> ref;
    ref.assign(ref_logp.begin(), ref_logp.end());
    kto::cpu::StepInputs<T> in;
    in.policy_logits = kto::logits_matrix<const T>(z.data(), N, V);
    in.targets = kto::targets_vector(targets.data(), N);
    in.sequences = kto::sequences(offsets.data(), B);
    in.reference_logp = kto::reference_logp(ref);
    in.desirable = kto::make_span(desirable);
    grad.assign(z.size(), T(0));
    return kto::cpu::kto_step<T>(in, o, kto::logits_matrix<T>(grad.data(), N, V));
  }
};

const kto::LogitTransform kTransforms[] = {
    {0.5, 0.0, 1.0},   // scale
    {1.0, 3.0, 1.0},   // soft-cap (Gemma 2 uses 30 on larger logits)
    {2.0, 5.0, 0.7},   // all three
    {1.0, 0.0, 2.0},   // temperature
    {-1.5, 0.0, 1.0},  // a negative scale
};

}  // namespace

TEST_CASE("logit transform: float64 gradient equals central finite differences",
          "[logit_transform]") {
  const uint64_t seed = test::fresh_seed();
  INFO("KTO_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  Problem p(rng);
  std::normal_distribution<double> nd(0.0, 4.0);
  std::vector<double> z(static_cast<size_t>(p.N * p.V)), grad, scratch;
  for (auto& x : z) x = nd(rng);
  for (const auto& t : kTransforms) {
    INFO("a " << t.scale << ", c " << t.softcap << ", tau " << t.temperature);
    const kto::Options o = p.options(t);
    p.step(z, o, grad);
    std::uniform_int_distribution<size_t> pick(0, z.size() - 1);
    for (int k = 0; k < 40; ++k) {
      const size_t i = pick(rng);
      const double h = 1e-6, z_i = z[i];
      z[i] = z_i + h;
      const double up = p.step(z, o, scratch).metrics.loss;
      z[i] = z_i - h;
      const double down = p.step(z, o, scratch).metrics.loss;
      z[i] = z_i;
      const double fd = (up - down) / (2 * h);
      INFO("element " << i);
      KTO_CHECK_CLOSE(grad[i], fd, 1e-3, 1e-6);
    }
  }
}

TEST_CASE("logit transform: float32 logits path against the float64 path on transformed logits",
          "[logit_transform]") {
  const uint64_t seed = test::fresh_seed();
  INFO("KTO_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  // V = 3000 spans two of the row kernel's chunks: the running max and sums are rescaled.
  const index_t vocab = GENERATE(37, 3000);
  Problem p(rng, vocab);
  std::normal_distribution<double> nd(0.0, 4.0);
  std::vector<float> z(static_cast<size_t>(p.N * p.V)), grad;
  for (auto& x : z) x = static_cast<float>(nd(rng));
  for (index_t r = 0; r < p.N; ++r)  // the row's max in its second chunk: a rescale
    if (p.V > 2048) z[static_cast<size_t>(r * p.V + p.V - 1)] = 25.0f;
  for (const auto& t : kTransforms) {
    INFO("V " << p.V << ", a " << t.scale << ", c " << t.softcap << ", tau " << t.temperature);
    const kto::Options o = p.options(t);
    const auto got = p.step(z, o, grad);
    std::vector<double> zt(z.size()), gt;
    for (size_t i = 0; i < z.size(); ++i) zt[i] = f(z[i], t);
    const auto want = p.step(zt, p.options({}), gt);
    KTO_CHECK_CLOSE(got.metrics.loss, want.metrics.loss, 1.0, 1e-5);
    for (index_t s = 0; s < p.B; ++s) {
      double scale = 0;
      for (index_t r = p.offsets[s]; r < p.offsets[s + 1]; ++r)
        if (p.targets[r] != -100)
          scale += std::fabs(zt[r * p.V + p.targets[r]]) + std::fabs(want.row_lse[r]);
      KTO_CHECK_CLOSE(got.logp[s], want.logp[s], scale, 1e-5);
    }
    const double slope = std::max(1.0, std::fabs(t.scale) / t.temperature);
    for (index_t s = 0; s < p.B; ++s)
      for (index_t r = p.offsets[s]; r < p.offsets[s + 1]; ++r) {
        double row_max = 0, z_max = 0;
        for (index_t v = 0; v < p.V; ++v) {
          row_max = std::max(row_max, std::fabs(gt[r * p.V + v] * df(z[r * p.V + v], t)));
          z_max = std::max(z_max, std::fabs(zt[r * p.V + v]));
        }
        // g_s c_r (sums of log-probs: c_r = 1)
        const double token = std::fabs(want.examples.grad_logp[s]);
        const double scale = row_max + token * slope * (1 + std::fabs(want.row_lse[r]) + z_max);
        for (index_t v = 0; v < p.V; ++v) {
          const size_t i = static_cast<size_t>(r * p.V + v);
          INFO("row " << r << ", v " << v);
          KTO_CHECK_CLOSE(grad[i], gt[i] * df(z[i], t), scale, 1e-5);
        }
      }
  }
}

TEST_CASE("logit transform: the fused step against the float64 logits path", "[logit_transform]") {
  const uint64_t seed = test::fresh_seed();
  INFO("KTO_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  Problem p(rng);
  const index_t D = 16;
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<float> hidden(static_cast<size_t>(p.N * D)), weight(static_cast<size_t>(p.V * D)),
      bias(static_cast<size_t>(p.V));
  for (auto& x : hidden) x = static_cast<float>(nd(rng));
  for (auto& x : weight) x = static_cast<float>(nd(rng));
  for (auto& x : bias) x = static_cast<float>(nd(rng));
  std::vector<double> z(static_cast<size_t>(p.N * p.V)), mag(z.size());
  for (index_t r = 0; r < p.N; ++r)
    for (index_t v = 0; v < p.V; ++v) {
      double acc = bias[v], m = std::fabs(bias[v]);
      for (index_t d = 0; d < D; ++d) {
        acc += double(hidden[r * D + d]) * weight[v * D + d];
        m += std::fabs(double(hidden[r * D + d]) * weight[v * D + d]);
      }
      z[r * p.V + v] = acc;
      mag[r * p.V + v] = m;
    }
  kto::LinearHead<float> head{kto::matrix_view<const float>(weight.data(), p.V, D),
                              kto::make_span(bias)};
  const std::vector<float> ref(p.ref_logp.begin(), p.ref_logp.end());
  kto::cpu::FusedLinearInputs<float> in;
  in.hidden = kto::matrix_view<const float>(hidden.data(), p.N, D);
  in.targets = kto::targets_vector(p.targets.data(), p.N);
  in.sequences = kto::sequences(p.offsets.data(), p.B);
  in.reference_logp = kto::reference_logp(ref);
  in.desirable = kto::make_span(p.desirable);
  std::vector<float> dh(hidden.size()), dw(weight.size()), db(bias.size());
  kto::cpu::LinearGradients<float> grads{kto::matrix_view(dh.data(), p.N, D),
                                         kto::matrix_view(dw.data(), p.V, D),
                                         kto::make_span(db.data(), p.V)};
  for (const auto& t : kTransforms) {
    for (const auto strategy : {kto::FusedStrategy::keep_chunk, kto::FusedStrategy::recompute}) {
      INFO("a " << t.scale << ", c " << t.softcap << ", tau " << t.temperature << ", strategy "
                << static_cast<int>(strategy));
      kto::cpu::FusedLinearConfig cfg;
      cfg.strategy = strategy;
      cfg.chunk_bytes = 4 * sizeof(float) * (p.V + D);  // 4 rows: sequences split
      const auto got = kto::cpu::fused_linear_kto_step<float>(in, head, p.options(t), grads, cfg);
      // The float64 logits path with the same transform (its gradient checked by FD above).
      std::vector<double> zz(z), gz;
      const auto want = p.step(zz, p.options(t), gz);
      double mag_max = 0;
      for (double m : mag) mag_max = std::max(mag_max, m);
      const double k = t.max_derivative();
      KTO_CHECK_CLOSE(got.metrics.loss, want.metrics.loss, 1.0 + mag_max * k, 1e-5);
      for (index_t s = 0; s < p.B; ++s)
        KTO_CHECK_CLOSE(got.logp[s], want.logp[s],
                        (p.offsets[s + 1] - p.offsets[s]) * (1 + 2 * mag_max * k), 1e-5);
      // dH = G W, dW = Gᵀ H with G = ∂L/∂z (raw logits), in float64.
      double g_max = 0;
      for (double g : gz) g_max = std::max(g_max, std::fabs(g));
      // got[i, d] = Σ_j G(i, j) other[j, d], the gradient product in float64.
      auto check_product = [&](const std::vector<float>& got_grad, index_t rows, index_t inner,
                               auto&& g, const std::vector<float>& other) {
        for (index_t i = 0; i < rows; ++i)
          for (index_t d = 0; d < D; ++d) {
            double acc = 0, m = 0;
            for (index_t j = 0; j < inner; ++j) {
              acc += g(i, j) * other[j * D + d];
              m += std::fabs(other[j * D + d]);
            }
            KTO_CHECK_CLOSE(got_grad[i * D + d], acc, g_max * m * (1 + mag_max * k), 1e-5);
          }
      };
      check_product(
          dh, p.N, p.V, [&](index_t r, index_t v) { return gz[r * p.V + v]; }, weight);
      check_product(
          dw, p.V, p.N, [&](index_t v, index_t r) { return gz[r * p.V + v]; }, hidden);
    }
  }
}

TEST_CASE("logit transform: options are checked", "[logit_transform]") {
  kto::Options o;
  o.logit_scale = 0.0;
  CHECK_THROWS_WITH(kto::validate_options(o, "f"),
                    Catch::Contains("argument 'options.logit_scale' must be finite, nonzero"));
  o.logit_scale = 1.0;
  o.logit_softcap = -1.0;
  CHECK_THROWS_WITH(kto::validate_options(o, "f"),
                    Catch::Contains("argument 'options.logit_softcap' must be finite, >= 0"));
  o.logit_softcap = 0.0;
  o.temperature = 0.0;
  CHECK_THROWS_WITH(kto::validate_options(o, "f"),
                    Catch::Contains("argument 'options.temperature' must be finite, in [1e-6"));
}
