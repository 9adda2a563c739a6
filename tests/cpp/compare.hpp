// compare.hpp — one KTO step's outputs against the float64 reference, under
// the tolerance rule of support.hpp. Used by the CPU and the GPU tests alike.
#pragma once

#include <functional>
#include <vector>

#include <kto/metrics.hpp>
#include <kto/options.hpp>

#include "problem.hpp"
#include "reference.hpp"

namespace test {

/// What an implementation returned, upcast to double.
struct Observed {
  kto::Metrics metrics;
  std::vector<double> logp, ratio, reward, loss, grad_logp;
  std::vector<index_t> num_tokens;
  std::function<double(index_t row, index_t col)> grad;  ///< ∂L/∂Z of logical row, column
};

/// The options of the option-combination tests: the enumerated choices as
/// given, β and the weights away from 1 so that each one shows.
inline kto::Options combination(kto::LossType loss_type, kto::Link link, kto::ReferencePoint point,
                                kto::KlEstimator estimator, bool clamp, kto::Reduction reduction,
                                bool average) {
  kto::Options o;
  o.beta = 0.5;
  o.desirable_weight = 1.7;
  o.undesirable_weight = 0.6;
  o.loss_type = loss_type;
  o.link = link;
  o.reference_point = point;
  o.kl_estimator = estimator;
  o.clamp_kl = clamp;
  o.fixed_z0 = 0.75;
  o.reduction = reduction;
  o.average_logprob = average;
  return o;
}

/// Declares `const kto::Options name`, one of the 192 combinations of the
/// enumerated choices per generated run, and INFOs which. A macro: Catch's
/// GENERATE must expand in the test body.
#define KTO_GENERATE_COMBINATION(name)                                                             \
  const auto name##_loss = GENERATE(kto::LossType::kto, kto::LossType::apo_zero_unpaired);         \
  const auto name##_link = GENERATE(kto::Link::one_minus_sigmoid, kto::Link::neg_log_sigmoid);     \
  const auto name##_point = GENERATE(kto::ReferencePoint::kl_batch, kto::ReferencePoint::fixed,    \
                                     kto::ReferencePoint::zero);                                   \
  const auto name##_estimator = GENERATE(kto::KlEstimator::mean, kto::KlEstimator::nonempty_mean); \
  const bool name##_clamp = GENERATE(true, false);                                                 \
  const auto name##_reduction = GENERATE(kto::Reduction::mean, kto::Reduction::sum);               \
  const bool name##_average = GENERATE(false, true);                                               \
  const kto::Options name =                                                                        \
      test::combination(name##_loss, name##_link, name##_point, name##_estimator, name##_clamp,    \
                        name##_reduction, name##_average);                                         \
  INFO("loss_type " << int(name##_loss) << " link " << int(name##_link) << " point "               \
                    << int(name##_point) << " estimator " << int(name##_estimator) << " clamp "    \
                    << name##_clamp << " reduction " << int(name##_reduction) << " average "       \
                    << name##_average)

/// Condition scale of z0 when the KL log-probs are computed from logits in the
/// same call: Σ |ℓ_r| + |lse_r| of the largest KL sequence (its fp32 bound).
inline double kl_condition_scale(const ref::Problem& p, const kto::Options& o) {
  const ref::Forward f = ref::forward(p, o.ignore_index, o.average_logprob);
  double worst = 1.0;
  for (index_t s = 0; s < p.num_sequences(); ++s) {
    double a = 0;
    for (index_t r = p.offsets[s]; r < p.offsets[s + 1]; ++r)
      if (p.targets[r] != o.ignore_index) a += std::fabs(f.token_logp[r]) + std::fabs(f.lse[r]);
    if (o.average_logprob && f.num_tokens[s] > 0) a /= double(f.num_tokens[s]);
    worst = std::max(worst, a);
  }
  return worst;
}

/// The condition scales of compare_examples(), reused for gradient checks.
struct ExampleScales {
  std::vector<double> sequence;  ///< Σ|ℓ_r| + |lse_r| (+ |ref|, z0) per sequence
  double max_sequence = 0, lam = 1, denom = 1;
  /// Condition scale of ∂L/∂Z[r, ·] (0 on unscored rows).
  double row(const ref::Problem& p, const ref::Step& want, const kto::Options& o, index_t r) const {
    const index_t B = p.num_sequences();
    index_t s = -1;
    for (index_t q = 0; q < B; ++q)
      if (r >= p.offsets[q] && r < p.offsets[q + 1]) s = q;
    if (s < 0 || p.targets[r] == o.ignore_index) return 0.0;
    const double c_r = o.average_logprob ? 1.0 / want.fwd.num_tokens[s] : 1.0;
    return std::fabs(want.g[s]) * c_r * (1.0 + std::fabs(want.fwd.lse[r])) +
           c_r * lam * o.beta * o.beta * sequence[s] / denom;
  }
};

/// rtol: the accumulation type's (1e-5 fp32, 1e-12 fp64); z0_scale: the
/// condition scale of z0 (1 when the KL log-probs are given exactly, Σ|ℓ| +
/// |lse| of the largest KL sequence when they were computed in the same call).
/// Checks everything per example and the metrics; returns the scales.
inline ExampleScales compare_examples(const ref::Problem& p,
                                      const std::vector<double>& reference_logp,
                                      const ref::Step& want, const Observed& got,
                                      const kto::Options& o, double rtol, double z0_scale = 1.0) {
  const index_t B = p.num_sequences();
  // Condition scale of each sequence: Σ |ℓ_r| + |lse_r| over its scored rows.
  std::vector<double> seq_scale(B, 1.0);
  for (index_t s = 0; s < B; ++s) {
    double a = 0;
    for (index_t r = p.offsets[s]; r < p.offsets[s + 1]; ++r)
      if (p.targets[r] != o.ignore_index)
        a += std::fabs(want.fwd.token_logp[r]) + std::fabs(want.fwd.lse[r]);
    if (o.average_logprob && want.fwd.num_tokens[s] > 0) a /= double(want.fwd.num_tokens[s]);
    seq_scale[s] = std::max(1.0, a + std::fabs(reference_logp[s]) + z0_scale);
  }
  ExampleScales sc;
  sc.lam = std::max({o.desirable_weight, o.undesirable_weight, 1.0});
  sc.denom = o.reduction == kto::Reduction::sum ? 1.0
             : o.mean_denominator > 0           ? double(o.mean_denominator)
                                                : double(B);
  for (double s : seq_scale) sc.max_sequence = std::max(sc.max_sequence, s);
  const double lam = sc.lam, denom = sc.denom, max_scale = sc.max_sequence;

  for (index_t s = 0; s < B; ++s) {
    INFO("sequence " << s);
    CHECK(got.num_tokens[s] == want.fwd.num_tokens[s]);
    KTO_CHECK_CLOSE(got.logp[s], want.fwd.logp[s], seq_scale[s], rtol);
    KTO_CHECK_CLOSE(got.ratio[s], want.rho[s], seq_scale[s], rtol);
    KTO_CHECK_CLOSE(got.reward[s], want.reward[s], o.beta * seq_scale[s], rtol);
    KTO_CHECK_CLOSE(got.loss[s], want.loss_s[s], lam * o.beta * seq_scale[s], rtol);
    KTO_CHECK_CLOSE(got.grad_logp[s], want.g[s], lam * o.beta * o.beta * seq_scale[s] / denom,
                    rtol);
  }
  const auto& m = got.metrics;
  KTO_CHECK_CLOSE(m.kl, want.z0, z0_scale, rtol);
  KTO_CHECK_CLOSE(m.loss, want.loss, lam * o.beta * max_scale, rtol);
  KTO_CHECK_CLOSE(m.rewards_chosen, want.rewards_chosen, o.beta * max_scale, rtol);
  KTO_CHECK_CLOSE(m.rewards_rejected, want.rewards_rejected, o.beta * max_scale, rtol);
  KTO_CHECK_CLOSE(m.rewards_margins, want.margins, o.beta * max_scale, rtol);
  KTO_CHECK_CLOSE(m.logps_chosen, want.logps_chosen, max_scale, rtol);
  KTO_CHECK_CLOSE(m.logps_rejected, want.logps_rejected, max_scale, rtol);
  CHECK(m.count_chosen == want.n_chosen);
  CHECK(m.count_rejected == want.n_rejected);
  sc.sequence = seq_scale;
  return sc;
}

/// compare_examples() and every element of ∂L/∂Z; u: unit roundoff of the
/// type the gradient is stored in.
inline void compare_step(const ref::Problem& p, const std::vector<double>& reference_logp,
                         const ref::Step& want, const Observed& got, const kto::Options& o,
                         double rtol, double u, double z0_scale = 1.0) {
  const ExampleScales sc = compare_examples(p, reference_logp, want, got, o, rtol, z0_scale);

  // Every gradient element, against ∂L/∂Z of the reference.
  index_t bad = 0;
  for (index_t r = 0; r < p.rows; ++r) {
    const double row_scale = sc.row(p, want, o, r);
    for (index_t v = 0; v < p.vocab; ++v) {
      const double g = got.grad(r, v);
      const double w = want.grad[r * p.vocab + v];
      const bool ok = std::fabs(g - w) <= rtol * row_scale + u * std::fabs(w) && !std::isnan(g);
      if (!ok && bad++ < 5) {
        INFO("grad row " << r << " col " << v << " got " << g << " want " << w << " row_scale "
                         << row_scale);
        CHECK(ok);
      }
    }
  }
  CHECK(bad == 0);
}

/// Elements of `storage` outside the logical rows (row padding) still hold
/// their poison (NaN): nothing wrote past a row.
template <class Upcast, class T>
index_t written_padding(const std::vector<T>& storage, const kto::RowIndex& rows, index_t vocab,
                        Upcast upcast) {
  std::vector<char> touched(storage.size(), 0);
  for (index_t r = 0; r < rows.rows; ++r)
    for (index_t v = 0; v < vocab; ++v) touched[static_cast<size_t>(rows.offset(r) + v)] = 1;
  index_t written = 0;
  for (size_t i = 0; i < storage.size(); ++i)
    if (!touched[i] && !std::isnan(upcast(storage[i]))) ++written;
  return written;
}

/// Token statistics against float64 (problem `p` holds the logits the library saw after
/// any transform): per sequence, the sums over its scored rows of each row's entropy
/// and mean logit, at rtol 1e-5 of Σ (1 + max |z|) over those rows.
inline void compare_token_statistics(const ref::Problem& p, int64_t ignore_index,
                                     const std::vector<double>& entropy_sum,
                                     const std::vector<double>& mean_logit_sum) {
  REQUIRE(static_cast<int64_t>(entropy_sum.size()) == p.num_sequences());
  REQUIRE(static_cast<int64_t>(mean_logit_sum.size()) == p.num_sequences());
  for (int64_t s = 0; s < p.num_sequences(); ++s) {
    double entropy = 0, mean = 0, scale = 0;
    for (int64_t r = p.offsets[s]; r < p.offsets[s + 1]; ++r) {
      if (p.targets[r] == ignore_index) continue;
      const ref::RowStatistics row =
          ref::row_statistics(&p.logits[static_cast<size_t>(r * p.vocab)], p.vocab);
      entropy += row.entropy;
      mean += row.mean_logit;
      scale += 1 + row.max_abs;
    }
    INFO("sequence " << s);
    KTO_CHECK_CLOSE(entropy_sum[s], entropy, scale, 1e-5);
    KTO_CHECK_CLOSE(mean_logit_sum[s], mean, scale, 1e-5);
  }
}

}  // namespace test
