// Masked and extreme logits on every ISA: the results may not depend on how a packet
// exp treats −inf or −FLT_MAX (Eigen's clamps its argument: exp(−inf) is 0 at one
// packet width and ~3e-39 at another; cpu/packet_math.hpp).
//
// Each row mixes, inside the first packets and across a chunk boundary: −inf (a masked
// vocabulary), the type's lowest finite value (Hugging Face masks with finfo.min), a huge
// finite logit that takes all the probability, a chunk of only −inf, and an ignored row of
// NaN. Checked against float64 references written here:
//   - a masked logit's gradient is exactly 0 (its p underflows every type), in the logits
//     path, with a logit scale, and in the fused path's dZ, dW and db;
//   - lse, log-probs, gradients, entropy and mean logit under the rule of support.hpp:
//     rtol(T)·max(|want|, scale), where an entropy's scale is 1 + the range of the logits
//     whose p does not underflow double (masked entries add exactly 0 by design, so they
//     do not enter it) and a mean logit's is Σ|z| / V;
//   - finfo.min masks leave the mean logit finite (Σ z / V, not Σ z, is accumulated);
//   - a NaN in a scored row raises NonFiniteLogitsError with statistics on, wherever it is.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include <kto/cpu.hpp>

#include "fused_fixture.hpp"
#include "support.hpp"

namespace {

using kto::index_t;
constexpr index_t kIgnore = -100;

struct MaskedRowReference {
  double entropy = 0, mean_logit = 0, entropy_scale = 1, mean_scale = 0;
};

/// Two-pass float64 statistics; p = 0 entries (−inf, or underflowing double) add nothing.
MaskedRowReference masked_row_reference(const double* z, index_t V) {
  double m = -INFINITY;
  for (index_t v = 0; v < V; ++v) m = std::max(m, z[v]);
  double s = 0, lo = m, sum = 0, abs_sum = 0;
  for (index_t v = 0; v < V; ++v) {
    s += std::exp(z[v] - m);
    if (z[v] - m > -745.0) lo = std::min(lo, z[v]);  // p representable in double
    sum += z[v] / static_cast<double>(V);
    abs_sum += std::fabs(z[v]) / static_cast<double>(V);
  }
  MaskedRowReference out;
  const double lse = m + std::log(s);
  for (index_t v = 0; v < V; ++v) {
    const double p = std::exp(z[v] - lse);
    if (p > 0) out.entropy -= p * (z[v] - lse);
  }
  out.mean_logit = sum;
  out.entropy_scale = 1 + (m - lo);
  out.mean_scale = abs_sum;
  return out;
}

template <class T>
double lowest_of() {
  return test::upcast(std::numeric_limits<T>::lowest());
}

/// Row kinds of the masked batch (row r uses kind r % 6).
enum RowKind { neg_inf_in_packet, lowest_in_packet, huge_finite, masked_chunk, lowest_every_3rd };

/// N rows over 2 sequences; the last row is ignored and holds NaN.
template <class T>
struct MaskedBatch {
  index_t N = 7, V;
  std::vector<T> logits;
  std::vector<double> upcast;  // what the library sees, in double
  std::vector<index_t> targets, offsets = {0, 3, 7};
  std::vector<std::uint8_t> masked;  // 1 where p is 0 in every type

  MaskedBatch(std::mt19937_64& rng, index_t vocab) : V(vocab) {
    std::normal_distribution<double> nd(0.0, 2.0);
    std::uniform_int_distribution<index_t> tok(0, V - 1);
    const double inf = std::numeric_limits<double>::infinity();
    const double lowest = lowest_of<T>();
    // Half's largest is 65504: keep the huge logit representable in every type.
    const double huge = std::is_same<T, Eigen::half>::value ? 6.0e4 : 1.0e30;
    std::vector<double> z(static_cast<size_t>(N * V));
    masked.assign(z.size(), 0);
    for (auto& x : z) x = nd(rng);
    auto mask = [&](index_t r, index_t v, double value) {
      z[static_cast<size_t>(r * V + v)] = value;
      masked[static_cast<size_t>(r * V + v)] = 1;
    };
    for (index_t r = 0; r + 1 < N; ++r) {
      switch (static_cast<RowKind>(r % 5)) {
        case neg_inf_in_packet:
          for (index_t v : {1, 2, 5, 9, 14}) mask(r, v % V, -inf);
          break;
        case lowest_in_packet:
          for (index_t v : {0, 3, 6, 7, 17}) mask(r, v % V, lowest);
          break;
        case huge_finite:  // v = 4 holds p ≈ 1; every other p underflows
          for (index_t v = 0; v < V; ++v) masked[static_cast<size_t>(r * V + v)] = v != 4 % V;
          z[static_cast<size_t>(r * V + 4 % V)] = huge;
          break;
        case masked_chunk:  // a whole 2048-column chunk of −inf when the row has one
          for (index_t v = std::min<index_t>(2048, V / 2); v < std::min<index_t>(4096, V); ++v)
            mask(r, v, -inf);
          break;
        case lowest_every_3rd:
          for (index_t v = 1; v < V; v += 3) mask(r, v, lowest);
          break;
      }
    }
    for (index_t v = 0; v < V; v += 2) z[static_cast<size_t>((N - 1) * V + v)] = NAN;
    logits.resize(z.size());
    upcast.resize(z.size());
    for (size_t i = 0; i < z.size(); ++i) {
      logits[i] = test::to_type<T>(z[i]);
      upcast[i] = test::upcast(logits[i]);
    }
    for (index_t r = 0; r + 1 < N; ++r) {  // each target a logit that is not masked
      index_t t = tok(rng);
      while (masked[static_cast<size_t>(r * V + t)]) t = (t + 1) % V;
      targets.push_back(t);
    }
    targets.push_back(kIgnore);
  }
  ref::Problem problem(const kto::Options& o) const {
    ref::Problem p;
    p.rows = N;
    p.vocab = V;
    p.logits = upcast;
    p.targets = targets;
    p.offsets = offsets;
    p = ref::transformed(p, o);
    // The library transforms in its accumulator: a·lowest may overflow to −inf there.
    for (double& z : p.logits) z = static_cast<double>(static_cast<kto::accumulator_t<T>>(z));
    return p;
  }
  kto::cpu::StepInputs<T> inputs(const std::vector<kto::accumulator_t<T>>& ref_logp,
                                 const std::vector<std::uint8_t>& desirable) const {
    kto::cpu::StepInputs<T> in;
    in.policy_logits = kto::logits_matrix<const T>(logits.data(), N, V);
    in.targets = kto::targets_vector(targets.data(), N);
    in.sequences = kto::sequences(offsets.data(), 2);
    in.reference_logp = kto::reference_logp(ref_logp);
    in.desirable = kto::make_span(desirable);
    return in;
  }
};

}  // namespace

TEMPLATE_TEST_CASE("masked logits: lse, log-probs, statistics and gradients on every ISA",
                   "[masked][token_statistics]", float, double, Eigen::half, Eigen::bfloat16) {
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  INFO("KTO_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  const double rtol = test::rtol<T>();
  for (const index_t V : {37, 300, 4099}) {
    const MaskedBatch<T> b(rng, V);
    kto::Options o;
    o.token_statistics = true;
    o.reference_point = kto::ReferencePoint::zero;
    for (const double logit_scale : {1.0, 1.5}) {
      o.logit_scale = logit_scale;  // 1.5 × lowest overflows to −inf in the accumulator
      INFO("V = " << V << ", logit_scale " << logit_scale);
      const ref::Problem p = b.problem(o);
      const std::vector<kto::accumulator_t<T>> ref_logp = {-20.0, -30.0};
      const std::vector<std::uint8_t> desirable = {1, 0};
      const ref::Step want = ref::step(p, {-20.0, -30.0}, desirable, {}, {}, o);

      std::vector<T> grad(b.logits.size(), T(std::numeric_limits<float>::quiet_NaN()));
      const auto got = kto::cpu::kto_step<T>(b.inputs(ref_logp, desirable), o,
                                             kto::logits_matrix<T>(grad.data(), b.N, V));
      for (index_t s = 0; s < 2; ++s) {
        double logp_scale = 0, h = 0, hs = 0, mz = 0, ms = 0;
        for (index_t r = b.offsets[s]; r < b.offsets[s + 1]; ++r) {
          if (b.targets[r] == kIgnore) continue;
          logp_scale += std::fabs(want.fwd.token_logp[r]) + std::fabs(want.fwd.lse[r]);
          const MaskedRowReference row = masked_row_reference(&p.logits[r * V], V);
          h += row.entropy, hs += row.entropy_scale, mz += row.mean_logit, ms += row.mean_scale;
        }
        INFO("sequence " << s);
        KTO_CHECK_CLOSE(got.logp[s], want.fwd.logp[s], logp_scale, rtol);
        KTO_CHECK_CLOSE(got.token_statistics.entropy_sum[s], h, hs, rtol);
        if (std::isinf(mz)) {
          CHECK(got.token_statistics.mean_logit_sum[s] == mz);
        } else {
          CHECK(std::isfinite(got.token_statistics.mean_logit_sum[s]));
          KTO_CHECK_CLOSE(got.token_statistics.mean_logit_sum[s], mz, ms, rtol);
        }
      }
      index_t bad = 0, masked_nonzero = 0;
      for (index_t r = 0; r < b.N; ++r) {
        if (b.targets[r] == kIgnore) continue;
        const index_t s = r < b.offsets[1] ? 0 : 1;
        const double scale =
            std::fabs(want.g[s]) * (1.0 + std::fabs(want.fwd.lse[r])) * std::max(1.0, logit_scale);
        for (index_t v = 0; v < V; ++v) {
          const size_t i = static_cast<size_t>(r * V + v);
          const double g = test::upcast(grad[i]);
          if (b.masked[i]) {
            if (g != 0.0 && masked_nonzero++ < 3) CHECK(g == 0.0);
            continue;
          }
          const double w = want.grad[i] * logit_scale;
          const double tol =
              rtol * std::max(std::fabs(w), scale) + test::unit_roundoff<T>() * std::fabs(w);
          if (!(std::fabs(g - w) <= tol) && bad++ < 3) {
            INFO("grad[" << r << ", " << v << "] = " << g << ", want " << w);
            CHECK(std::fabs(g - w) <= tol);
          }
        }
      }
      CHECK(bad == 0);
      CHECK(masked_nonzero == 0);
    }
  }
}

TEST_CASE("masked logits: a NaN in a scored row is reported with statistics on",
          "[masked][nonfinite]") {
  const index_t V = 300, N = 2;
  std::vector<index_t> targets = {0, 1}, offsets = {0, 2};
  kto::Options o;
  o.token_statistics = true;
  for (const index_t col : {index_t{1}, index_t{5}, index_t{17}, V - 1}) {
    for (const bool masked_row : {false, true}) {  // the NaN among −inf or among finite logits
      std::vector<float> z(static_cast<size_t>(N * V), 0.5f);
      if (masked_row)
        std::fill(z.begin() + V + 2, z.end(), -std::numeric_limits<float>::infinity());
      z[static_cast<size_t>(V + col)] = NAN;
      INFO("col " << col << ", among −inf " << masked_row);
      try {
        kto::cpu::sequence_logprobs<float>(kto::logits_matrix<const float>(z.data(), N, V),
                                           kto::targets_vector(targets.data(), N),
                                           kto::sequences(offsets.data(), 1), o);
        FAIL("no NonFiniteLogitsError");
      } catch (const kto::NonFiniteLogitsError& e) {
        CHECK(e.row() == 1);
      }
    }
  }
}

TEMPLATE_TEST_CASE("masked logits: a masked bias column gets exactly zero dW, db and p",
                   "[masked][fused]", float, double) {
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  INFO("KTO_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  test::FusedSpec spec;
  spec.vocab = 301;
  test::FusedProblem fp = make_problem<T>(rng, spec);
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<index_t> neg_inf_columns = {1, 2, 5, 130}, lowest_columns = {3, 6, 7, 200};
  for (index_t v : neg_inf_columns) fp.bias[v] = -inf;
  for (index_t v : lowest_columns) fp.bias[v] = lowest_of<T>();
  for (auto& t : fp.targets)  // targets on columns that keep their probability
    while (t != kIgnore && fp.bias[t] < -1e30) t = (t + 11) % fp.vocab;
  for (auto& t : fp.kl_targets)
    while (t != kIgnore && fp.bias[t] < -1e30) t = (t + 11) % fp.vocab;
  // The fused rows' extra scale (support.hpp): the products' magnitude max_v Σ_k |h_k W_vk|.
  double product_scale = 0;
  for (index_t r = 0; r < fp.rows; ++r)
    for (index_t v = 0; v < fp.vocab; ++v) {
      double mag = 0;
      for (index_t k = 0; k < fp.dim; ++k)
        mag += std::fabs(fp.hidden[r * fp.dim + k] * fp.weight[v * fp.dim + k]);
      product_scale = std::max(product_scale, mag);
    }
  kto::Options o;
  o.token_statistics = true;
  const test::FusedReference R = test::fused_reference(fp, o);
  for (const auto strategy : {FusedStrategy::keep_chunk, FusedStrategy::recompute}) {
    INFO("strategy " << static_cast<int>(strategy));
    const Run<T> run = run_fused<T>(fp, o, config_rows<T>(fp, 3, strategy));
    test::compare_fused(fp, R, observe(run), o, test::rtol<T>());
    for (const auto& columns : {neg_inf_columns, lowest_columns})
      for (index_t v : columns) {
        INFO("column " << v);
        CHECK(run.d_bias[v] == 0);
        for (index_t k = 0; k < fp.dim; ++k) CHECK(run.d_weight[v * fp.dim + k] == 0);
      }
    for (index_t s = 0; s < static_cast<index_t>(fp.offsets.size()) - 1; ++s) {
      double h = 0, hs = 0, mz = 0, ms = 0;
      for (index_t r = fp.offsets[s]; r < fp.offsets[s + 1]; ++r) {
        if (fp.targets[r] == kIgnore) continue;
        const MaskedRowReference row =
            masked_row_reference(&R.problem.logits[r * fp.vocab], fp.vocab);
        h += row.entropy, hs += row.entropy_scale + product_scale, mz += row.mean_logit;
        ms += row.mean_scale + product_scale;
      }
      INFO("sequence " << s);
      KTO_CHECK_CLOSE(run.result.token_statistics.entropy_sum[s], h, hs, test::rtol<T>());
      if (std::isinf(mz))
        CHECK(run.result.token_statistics.mean_logit_sum[s] == mz);
      else
        KTO_CHECK_CLOSE(run.result.token_statistics.mean_logit_sum[s], mz, ms, test::rtol<T>());
    }
  }
}
