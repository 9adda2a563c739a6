// Token statistics (token_statistics.hpp): each sequence's sums of its scored tokens' entropy
// and mean logit, from the pass that computes lse, on every CPU path (logits, fused keep_chunk
// and recompute, fused forward only), against a float64 reference written here from the
// definitions (H = −Σ p log p with p from a two-pass softmax; mean = Σ z / V).
//
// Tolerance (docs/math.md §7): fp32 accumulation, rtol 1e-5 of max(|want|, scale), where the
// scale of a sum is the sum of its terms' scales. A row's entropy is computed from the
// differences z − max z, so its scale is 1 + (max z − min finite z) (the row's range, not
// its magnitude: a row shifted by 1e4 keeps its accuracy, which is tested); a fused row adds
// the magnitude of its products, max_v (Σ_d |h_d W_vd| + |b_v|). The mean logit's scale is
// Σ_v |z_v| / V (plus the products' magnitude for a fused row).
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include <kto/cpu.hpp>

#include "problem.hpp"

namespace {

using kto::index_t;
constexpr index_t kIgnore = -100;

struct RowReference {
  double entropy = 0, mean_logit = 0, entropy_scale = 0, mean_scale = 0;
};

RowReference reference_row(const std::vector<double>& z, double product_scale = 0) {
  RowReference out;
  double m = -INFINITY, lo = INFINITY, abs_sum = 0, sum = 0;
  for (double v : z) {
    m = std::max(m, v);
    if (std::isfinite(v)) lo = std::min(lo, v);
    sum += v;
    abs_sum += std::fabs(v);
  }
  double s = 0;
  for (double v : z) s += std::exp(v - m);
  for (double v : z) {
    const double p = std::exp(v - m) / s;
    if (p > 0) out.entropy -= p * std::log(p);
  }
  out.mean_logit = sum / static_cast<double>(z.size());
  out.entropy_scale = 1 + (m - lo) + product_scale;
  out.mean_scale = abs_sum / static_cast<double>(z.size()) + product_scale;
  return out;
}

struct Batch {
  index_t N = 0, V = 0;
  std::vector<index_t> targets, offsets;
  std::vector<RowReference> rows;  // per row (scored rows only meaningful)
  void expect(const kto::SequenceTokenStatistics& got) const {
    const index_t B = static_cast<index_t>(offsets.size()) - 1;
    REQUIRE(static_cast<index_t>(got.entropy_sum.size()) == B);
    REQUIRE(static_cast<index_t>(got.mean_logit_sum.size()) == B);
    for (index_t s = 0; s < B; ++s) {
      double h = 0, hs = 0, z = 0, zs = 0;
      for (index_t r = offsets[s]; r < offsets[s + 1]; ++r) {
        if (targets[r] == kIgnore) continue;
        h += rows[r].entropy;
        hs += rows[r].entropy_scale;
        z += rows[r].mean_logit;
        zs += rows[r].mean_scale;
      }
      INFO("sequence " << s);
      KTO_CHECK_CLOSE(got.entropy_sum[s], h, hs, 1e-5);
      if (std::isinf(z))
        CHECK(got.mean_logit_sum[s] == z);
      else
        KTO_CHECK_CLOSE(got.mean_logit_sum[s], z, zs, 1e-5);
    }
  }
};

/// Three sequences over N rows (the second all ignored), some rows ignored.
Batch make_batch(std::mt19937_64& rng, index_t N, index_t V) {
  Batch b;
  b.N = N;
  b.V = V;
  b.offsets = {0, N / 3, N / 3 + 2, N};
  std::uniform_int_distribution<index_t> tok(0, V - 1);
  for (index_t r = 0; r < N; ++r) {
    const bool ignored = (r >= b.offsets[1] && r < b.offsets[2]) || r % 4 == 0;
    b.targets.push_back(ignored ? kIgnore : tok(rng));
  }
  return b;
}

}  // namespace

TEST_CASE("token statistics on the logits path: sequence_logprobs and step_forward",
          "[token_statistics]") {
  const uint64_t seed = test::fresh_seed();
  INFO("KTO_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  for (const double shift : {0.0, 1e4}) {
    for (const index_t V : {1, 3, 123, 5000}) {
      const index_t N = 13;
      Batch b = make_batch(rng, N, V);
      std::normal_distribution<double> nd(0.0, 3.0);
      std::vector<float> logits(static_cast<size_t>(N * V));
      for (auto& x : logits) x = static_cast<float>(shift + nd(rng));
      if (V > 3) {  // a masked vocabulary entry (−inf) in one scored row
        logits[static_cast<size_t>(1 * V + 2)] = -std::numeric_limits<float>::infinity();
        b.targets[1] = 0;
      }
      for (index_t r = 0; r < N; ++r) {
        std::vector<double> z(logits.begin() + r * V, logits.begin() + (r + 1) * V);
        b.rows.push_back(reference_row(z));
      }
      INFO("V = " << V << ", shift " << shift);
      kto::Options o;
      o.token_statistics = true;
      o.reference_point = kto::ReferencePoint::zero;
      const auto view = kto::logits_matrix<const float>(logits.data(), N, V);
      const auto tv = kto::targets_vector(b.targets.data(), N);
      const auto seqs = kto::sequences(b.offsets.data(), 3);
      b.expect(kto::cpu::sequence_logprobs<float>(view, tv, seqs, o).token_statistics);

      const std::vector<float> ref(3, -5.0f);
      const std::vector<std::uint8_t> desirable = {1, 0, 1};
      kto::cpu::StepInputs<float> in;
      in.policy_logits = view;
      in.targets = tv;
      in.sequences = seqs;
      in.reference_logp = kto::reference_logp(ref);
      in.desirable = kto::make_span(desirable);
      const auto step = kto::cpu::step_forward<float>(in, o);
      b.expect(step.token_statistics);

      o.token_statistics = false;  // off: nothing returned, the same log-probs bit for bit
      const auto plain = kto::cpu::step_forward<float>(in, o);
      CHECK(plain.token_statistics.entropy_sum.empty());
      CHECK(plain.logp == step.logp);
    }
  }
}

TEST_CASE("token statistics on the fused-linear path", "[token_statistics][fused]") {
  const uint64_t seed = test::fresh_seed();
  INFO("KTO_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  const index_t N = 17, V = 301, D = 24;
  Batch b = make_batch(rng, N, V);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<float> hidden(static_cast<size_t>(N * D)), weight(static_cast<size_t>(V * D)),
      bias(static_cast<size_t>(V));
  for (auto& x : hidden) x = static_cast<float>(nd(rng));
  for (auto& x : weight) x = static_cast<float>(0.5 * nd(rng));
  for (auto& x : bias) x = static_cast<float>(nd(rng));
  for (index_t r = 0; r < N; ++r) {
    std::vector<double> z(static_cast<size_t>(V));
    double product_scale = 0;
    for (index_t v = 0; v < V; ++v) {
      double acc = bias[v], mag = std::fabs(bias[v]);
      for (index_t d = 0; d < D; ++d) {
        acc += double(hidden[r * D + d]) * double(weight[v * D + d]);
        mag += std::fabs(double(hidden[r * D + d]) * double(weight[v * D + d]));
      }
      z[v] = acc;
      product_scale = std::max(product_scale, mag);
    }
    b.rows.push_back(reference_row(z, product_scale));
  }
  kto::LinearHead<float> head{kto::matrix_view<const float>(weight.data(), V, D),
                              kto::make_span(bias)};
  const auto tv = kto::targets_vector(b.targets.data(), N);
  const auto seqs = kto::sequences(b.offsets.data(), 3);
  kto::Options o;
  o.token_statistics = true;
  o.reference_point = kto::ReferencePoint::zero;

  b.expect(kto::cpu::fused_linear_logprobs<float>(
               kto::matrix_view<const float>(hidden.data(), N, D), tv, seqs, head, o)
               .token_statistics);

  const std::vector<float> ref(3, -5.0f);
  const std::vector<std::uint8_t> desirable = {1, 0, 0};
  kto::cpu::FusedLinearInputs<float> in;
  in.hidden = kto::matrix_view<const float>(hidden.data(), N, D);
  in.targets = tv;
  in.sequences = seqs;
  in.reference_logp = kto::reference_logp(ref);
  in.desirable = kto::make_span(desirable);
  std::vector<float> dh(static_cast<size_t>(N * D)), dw(static_cast<size_t>(V * D)),
      db(static_cast<size_t>(V));
  kto::cpu::LinearGradients<float> grads{kto::matrix_view(dh.data(), N, D),
                                         kto::matrix_view(dw.data(), V, D),
                                         kto::make_span(db.data(), V)};
  for (const auto strategy : {kto::FusedStrategy::keep_chunk, kto::FusedStrategy::recompute}) {
    for (const size_t chunk : {size_t{1} << 20, size_t{4} * (V + D) * 3}) {  // whole; 3 rows
      INFO("strategy " << static_cast<int>(strategy) << ", chunk " << chunk);
      kto::cpu::FusedLinearConfig cfg;
      cfg.chunk_bytes = chunk;
      cfg.strategy = strategy;
      const auto r = kto::cpu::fused_linear_kto_step<float>(in, head, o, grads, cfg);
      b.expect(r.token_statistics);
    }
  }
}

TEST_CASE("token statistics: refused where not computed", "[token_statistics][errors]") {
  // A vocabulary slice's row partials carry no entropy: an error, never a wrong sum.
  const index_t N = 2, V = 4, D = 2;
  std::vector<float> hidden(N * D, 0.5f), weight(V * D, 0.25f), dh(N * D), dw(V * D);
  std::vector<index_t> targets = {1, 2}, offsets = {0, 2};
  const std::vector<float> ref = {-1.0f};
  const std::vector<std::uint8_t> desirable = {1};
  kto::LinearHead<float> head{kto::matrix_view<const float>(weight.data(), V, D), {}, 0, 2 * V};
  kto::cpu::FusedLinearInputs<float> in;
  in.hidden = kto::matrix_view<const float>(hidden.data(), N, D);
  in.targets = kto::targets_vector(targets.data(), N);
  in.sequences = kto::sequences(offsets.data(), 1);
  in.reference_logp = kto::reference_logp(ref);
  in.desirable = kto::make_span(desirable);
  kto::cpu::LinearGradients<float> grads{
      kto::matrix_view(dh.data(), N, D), kto::matrix_view(dw.data(), V, D), {}};
  kto::Options o;
  o.token_statistics = true;
  o.reference_point = kto::ReferencePoint::zero;
  kto::cpu::FusedLinearHooks<float> hooks;
  hooks.gather_partials = [](const auto& local, auto& all) { all = local; };
  CHECK_THROWS_WITH(kto::cpu::fused_linear_kto_step<float>(in, head, o, grads, {}, {}, hooks),
                    Catch::Contains("kto::cpu::fused_linear_kto_step: argument "
                                    "'options.token_statistics' must be false with a "
                                    "vocabulary slice"));
}

TEST_CASE("token statistics of soft-capped logits", "[token_statistics][logit_transform]") {
  // The statistics are of the distribution the loss sees: z' = c·tanh(a z / c) / τ, here
  // written in float64 by the test; a masked (−inf) logit becomes −c/τ, as in the model.
  const uint64_t seed = test::fresh_seed();
  INFO("KTO_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  const double a = 1.5, c = 4.0, tau = 0.8;
  for (const index_t V : {123, 5000}) {
    const index_t N = 13;
    Batch b = make_batch(rng, N, V);
    std::normal_distribution<double> nd(0.0, 5.0);
    std::vector<float> logits(static_cast<size_t>(N * V));
    for (auto& x : logits) x = static_cast<float>(nd(rng));
    logits[static_cast<size_t>(1 * V + 2)] = -std::numeric_limits<float>::infinity();
    b.targets[1] = 0;
    for (index_t r = 0; r < N; ++r) {
      std::vector<double> z(static_cast<size_t>(V));
      for (index_t v = 0; v < V; ++v) z[v] = c * std::tanh(a * logits[r * V + v] / c) / tau;
      b.rows.push_back(reference_row(z, 2 * c / tau));  // |z'| <= c/τ: scale of the products
    }
    INFO("V = " << V);
    kto::Options o;
    o.token_statistics = true;
    o.logit_scale = a;
    o.logit_softcap = c;
    o.temperature = tau;
    b.expect(kto::cpu::sequence_logprobs<float>(
                 kto::logits_matrix<const float>(logits.data(), N, V),
                 kto::targets_vector(b.targets.data(), N), kto::sequences(b.offsets.data(), 3), o)
                 .token_statistics);
  }
}
