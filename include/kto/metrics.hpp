// metrics.hpp — the batch metrics TRL logs, accumulated in a fixed order.
//
//   rewards/chosen   = mean of βρ over desirable examples   (NaN when none)
//   rewards/rejected = mean of βρ over undesirable examples (NaN when none)
//   rewards/margins  = chosen − rejected, an empty side counted as 0 (TRL)
//   logps/chosen, logps/rejected: means of the policy sequence log-prob
//   kl               = z0
//   loss             = scale · Σ_s loss_s
//
// MetricSums is a plain sum that merges associatively, so the CPU loop and a
// device tree reduction fill it the same way; finalize() turns sums into means.
#pragma once

#include <math.h>

#include "config.hpp"

namespace kto {

struct Metrics {
  double loss = 0.0;
  double kl = 0.0;
  double rewards_chosen = 0.0;
  double rewards_rejected = 0.0;
  double rewards_margins = 0.0;
  double logps_chosen = 0.0;
  double logps_rejected = 0.0;
  index_t count_chosen = 0;
  index_t count_rejected = 0;
};

struct MetricSums {
  double loss = 0.0;
  double reward_chosen = 0.0;
  double reward_rejected = 0.0;
  double logp_chosen = 0.0;
  double logp_rejected = 0.0;
  index_t count_chosen = 0;
  index_t count_rejected = 0;

  KTO_HOST_DEVICE void add(bool desirable, double loss_s, double reward_s, double logp_s) {
    loss += loss_s;
    if (desirable) {
      reward_chosen += reward_s;
      logp_chosen += logp_s;
      ++count_chosen;
    } else {
      reward_rejected += reward_s;
      logp_rejected += logp_s;
      ++count_rejected;
    }
  }
  KTO_HOST_DEVICE void merge(const MetricSums& o) {
    loss += o.loss;
    reward_chosen += o.reward_chosen;
    reward_rejected += o.reward_rejected;
    logp_chosen += o.logp_chosen;
    logp_rejected += o.logp_rejected;
    count_chosen += o.count_chosen;
    count_rejected += o.count_rejected;
  }
};

/// The binding contract: the metrics as a flat array of kMetricCount doubles,
/// in the order of kMetricNames (TRL's names). Every binding packs and names
/// them with these two, so the order has one home.
constexpr int kMetricCount = 9;
constexpr const char* kMetricNames[kMetricCount] = {"loss",
                                                    "kl",
                                                    "rewards/chosen",
                                                    "rewards/rejected",
                                                    "rewards/margins",
                                                    "logps/chosen",
                                                    "logps/rejected",
                                                    "count/chosen",
                                                    "count/rejected"};

KTO_HOST_DEVICE inline void metrics_to_array(const Metrics& m, double* out) {
  out[0] = m.loss;
  out[1] = m.kl;
  out[2] = m.rewards_chosen;
  out[3] = m.rewards_rejected;
  out[4] = m.rewards_margins;
  out[5] = m.logps_chosen;
  out[6] = m.logps_rejected;
  out[7] = static_cast<double>(m.count_chosen);
  out[8] = static_cast<double>(m.count_rejected);
}

/// The binding contract for per-example outputs: rows of a [kExampleOutputCount, B]
/// array, in this order.
enum ExampleOutput : int {
  kExampleLogp = 0,      ///< policy logp_s
  kExampleRatio = 1,     ///< ρ_s
  kExampleReward = 2,    ///< βρ_s
  kExampleLoss = 3,      ///< λ f(u_s), before the reduction
  kExampleGradLogp = 4,  ///< g_s = ∂L/∂logp_s
  kExampleOutputCount = 5
};
constexpr const char* kExampleOutputNames[kExampleOutputCount] = {"logp", "ratio", "reward", "loss",
                                                                  "grad_logp"};

KTO_HOST_DEVICE inline Metrics finalize(const MetricSums& s, double z0, double scale) {
  const double nan = NAN;
  Metrics m;
  m.loss = s.loss * scale;
  m.kl = z0;
  m.count_chosen = s.count_chosen;
  m.count_rejected = s.count_rejected;
  const double nc = static_cast<double>(s.count_chosen);
  const double nr = static_cast<double>(s.count_rejected);
  m.rewards_chosen = s.count_chosen ? s.reward_chosen / nc : nan;
  m.rewards_rejected = s.count_rejected ? s.reward_rejected / nr : nan;
  m.logps_chosen = s.count_chosen ? s.logp_chosen / nc : nan;
  m.logps_rejected = s.count_rejected ? s.logp_rejected / nr : nan;
  m.rewards_margins =
      (s.count_chosen ? m.rewards_chosen : 0.0) - (s.count_rejected ? m.rewards_rejected : 0.0);
  return m;
}

}  // namespace kto
