// reference.hpp — a plain float64 KTO written for the tests, from docs/math.md.
//
// Deliberately naive: dense row-major double logits, two-pass log-sum-exp,
// the loss table written out case by case, the gradient from the closed form.
// It shares no code with the library beyond the Options enums.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <kto/options.hpp>

namespace ref {

struct Problem {
  int64_t rows = 0, vocab = 0;
  std::vector<double> logits;    // rows × vocab, dense, already upcast from the test dtype
  std::vector<int64_t> targets;  // rows
  std::vector<int64_t> offsets;  // sequences + 1
  int64_t num_sequences() const { return static_cast<int64_t>(offsets.size()) - 1; }
};

struct Forward {
  std::vector<double> lse, token_logp;  // per row (ignored rows: lse unused, ℓ = 0)
  std::vector<double> logp;             // per sequence
  std::vector<int64_t> num_tokens;
};

inline Forward forward(const Problem& p, int64_t ignore_index, bool average) {
  Forward f;
  f.lse.assign(p.rows, 0.0);
  f.token_logp.assign(p.rows, 0.0);
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t t = p.targets[r];
    if (t == ignore_index) continue;
    const double* z = &p.logits[r * p.vocab];
    double m = -INFINITY;
    for (int64_t v = 0; v < p.vocab; ++v) m = std::max(m, z[v]);
    double s = 0;
    for (int64_t v = 0; v < p.vocab; ++v) s += std::exp(z[v] - m);
    f.lse[r] = m + std::log(s);
    f.token_logp[r] = z[t] - f.lse[r];
  }
  const int64_t n = p.num_sequences();
  f.logp.assign(n, 0.0);
  f.num_tokens.assign(n, 0);
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t r = p.offsets[s]; r < p.offsets[s + 1]; ++r) {
      if (p.targets[r] == ignore_index) continue;
      f.logp[s] += f.token_logp[r];
      f.num_tokens[s] += 1;
    }
    if (average && f.num_tokens[s] > 0) f.logp[s] /= static_cast<double>(f.num_tokens[s]);
  }
  return f;
}

/// z' = (c/τ)·tanh(a z / c), or a z / τ uncapped (docs/math.md's logit transform), and ∂z'/∂z.
inline double transform(double z, double scale, double softcap, double temperature) {
  return softcap > 0 ? softcap * std::tanh(scale * z / softcap) / temperature
                     : scale * z / temperature;
}
inline double transform_derivative(double z, double scale, double softcap, double temperature) {
  if (softcap == 0) return scale / temperature;
  const double th = std::tanh(scale * z / softcap);
  return scale / temperature * (1 - th * th);
}

/// The problem with every logit replaced by its transform under options `o`.
inline Problem transformed(Problem p, const kto::Options& o) {
  for (double& z : p.logits) z = transform(z, o.logit_scale, o.logit_softcap, o.temperature);
  return p;
}

/// One row's entropy and mean logit (and max |z| for tolerances), two-pass, in float64.
struct RowStatistics {
  double entropy, mean_logit, max_abs;
};
inline RowStatistics row_statistics(const double* z, int64_t vocab) {
  double m = -INFINITY, sum = 0, pz = 0, total = 0, max_abs = 0;
  for (int64_t v = 0; v < vocab; ++v) m = std::max(m, z[v]);
  for (int64_t v = 0; v < vocab; ++v) sum += std::exp(z[v] - m);
  const double lse = m + std::log(sum);
  for (int64_t v = 0; v < vocab; ++v) {
    pz += std::exp(z[v] - lse) * z[v];
    total += z[v];
    max_abs = std::max(max_abs, std::fabs(z[v]));
  }
  return {lse - pz, total / static_cast<double>(vocab), max_abs};
}

inline double sig(double u) {
  return 1.0 / (1.0 + std::exp(-u));
}

struct Step {
  /// z0 estimated from a KL batch with no example to count: the library raises
  /// (kl.count) instead of computing anything else.
  bool empty_kl = false;
  double z0 = 0, loss = 0;
  std::vector<double> rho, reward, loss_s, g;
  double rewards_chosen = NAN, rewards_rejected = NAN, margins = 0;
  double logps_chosen = NAN, logps_rejected = NAN;
  int64_t n_chosen = 0, n_rejected = 0;
  std::vector<double> grad;  // rows × vocab
  Forward fwd;
};

/// kl_rho: ρ_j of the KL batch; kl_tokens: their token counts.
inline Step step(const Problem& p, const std::vector<double>& ref_logp,
                 const std::vector<uint8_t>& desirable, const std::vector<double>& kl_rho,
                 const std::vector<int64_t>& kl_tokens, const kto::Options& o) {
  using namespace kto;
  Step out;
  out.fwd = forward(p, o.ignore_index, o.average_logprob);
  const int64_t B = p.num_sequences();

  // Reference point.
  if (o.loss_type == LossType::kto && o.reference_point == ReferencePoint::kl_batch) {
    double S = 0, C = 0;
    for (size_t j = 0; j < kl_rho.size(); ++j) {
      if (o.kl_estimator == KlEstimator::nonempty_mean && kl_tokens[j] == 0) continue;
      S += kl_rho[j];
      C += 1;
    }
    out.empty_kl = C == 0;
    out.z0 = C > 0 ? S / C : 0.0;
    if (o.clamp_kl) out.z0 = std::max(0.0, out.z0);
  } else if (o.loss_type == LossType::kto && o.reference_point == ReferencePoint::fixed) {
    out.z0 = o.fixed_z0;
  } else {
    out.z0 = 0.0;
  }

  const double denom = o.reduction == Reduction::sum ? 1.0
                       : o.mean_denominator > 0      ? double(o.mean_denominator)
                                                     : double(B);
  const double lam_d = o.desirable_weight, lam_u = o.undesirable_weight, beta = o.beta;
  double rc = 0, rr = 0, lc = 0, lr = 0, total = 0;
  for (int64_t s = 0; s < B; ++s) {
    const double rho = out.fwd.logp[s] - ref_logp[s];
    const bool d = desirable[s] != 0;
    double loss, g;
    if (o.loss_type == LossType::kto || o.loss_type == LossType::apo_zero_unpaired) {
      // apo_zero_unpaired: λ_D(1 − σ(βρ)) and λ_U σ(βρ) — the kto rows with z0 = 0.
      const double u = d ? beta * (rho - out.z0) : beta * (out.z0 - rho);
      const double sp = sig(u) * (1 - sig(u));
      if (o.link == Link::one_minus_sigmoid) {
        loss = (d ? lam_d : lam_u) * (1 - sig(u));
        g = d ? -(lam_d / denom) * beta * sp : (lam_u / denom) * beta * sp;
      } else {
        loss = (d ? lam_d : lam_u) * -std::log(sig(u));
        g = d ? -(lam_d / denom) * beta * (1 - sig(u)) : (lam_u / denom) * beta * (1 - sig(u));
      }
    }
    out.rho.push_back(rho);
    out.reward.push_back(beta * rho);
    out.loss_s.push_back(loss);
    out.g.push_back(g);
    total += loss;
    if (d) {
      rc += beta * rho, lc += out.fwd.logp[s], ++out.n_chosen;
    } else {
      rr += beta * rho, lr += out.fwd.logp[s], ++out.n_rejected;
    }
  }
  out.loss = total / denom;
  if (out.n_chosen) out.rewards_chosen = rc / out.n_chosen, out.logps_chosen = lc / out.n_chosen;
  if (out.n_rejected)
    out.rewards_rejected = rr / out.n_rejected, out.logps_rejected = lr / out.n_rejected;
  out.margins =
      (out.n_chosen ? out.rewards_chosen : 0) - (out.n_rejected ? out.rewards_rejected : 0);

  // ∂L/∂Z[r,v] = g_s c_r (1[v = t_r] − softmax(Z_r)_v); zero on unscored rows.
  out.grad.assign(p.rows * p.vocab, 0.0);
  for (int64_t s = 0; s < B; ++s) {
    for (int64_t r = p.offsets[s]; r < p.offsets[s + 1]; ++r) {
      const int64_t t = p.targets[r];
      if (t == o.ignore_index) continue;
      const double c = o.average_logprob ? 1.0 / out.fwd.num_tokens[s] : 1.0;
      for (int64_t v = 0; v < p.vocab; ++v) {
        const double prob = std::exp(p.logits[r * p.vocab + v] - out.fwd.lse[r]);
        out.grad[r * p.vocab + v] = out.g[s] * c * ((v == t ? 1.0 : 0.0) - prob);
      }
    }
  }
  return out;
}

}  // namespace ref
