// weights.hpp — choosing λ_D and λ_U for an imbalanced dataset.
//
// The KTO paper recommends weights with
//
//     1 ≤ (λ_D · n_D) / (λ_U · n_U) ≤ 4/3
//
// where n_D, n_U count desirable and undesirable examples: the desirable side
// may carry up to a third more total weight, never less. propose_weights()
// keeps the majority side at weight 1 and raises the minority side so the ratio
// hits `target_ratio` (default 1, the lower edge, for balanced influence);
// check_weights() says whether a given config is inside the band.
#pragma once

#include <cmath>
#include <sstream>
#include <string>

#include "config.hpp"
#include "error.hpp"

namespace kto {

constexpr double kWeightBandLow = 1.0;
constexpr double kWeightBandHigh = 4.0 / 3.0;

struct ClassWeights {
  double desirable;
  double undesirable;
};

inline ClassWeights propose_weights(index_t num_desirable, index_t num_undesirable,
                                    double target_ratio = 1.0) {
  const char* fn = "kto::propose_weights";
  detail::require(num_desirable >= 1, fn, "num_desirable", "be >= 1", num_desirable);
  detail::require(num_undesirable >= 1, fn, "num_undesirable", "be >= 1", num_undesirable);
  detail::require(target_ratio >= kWeightBandLow && target_ratio <= kWeightBandHigh, fn,
                  "target_ratio", "be in [1, 4/3]", target_ratio);
  const double nd = static_cast<double>(num_desirable);
  const double nu = static_cast<double>(num_undesirable);
  // λ_D n_D = target · λ_U n_U, majority side at 1.
  if (nd <= target_ratio * nu) return {target_ratio * nu / nd, 1.0};
  return {1.0, nd / (target_ratio * nu)};
}

struct WeightCheck {
  double ratio;      ///< λ_D n_D / (λ_U n_U); NaN when a side is empty
  bool within_band;  ///< ratio in [1, 4/3] (true when the band does not apply)
  std::string message;
};

inline WeightCheck check_weights(double desirable_weight, double undesirable_weight,
                                 index_t num_desirable, index_t num_undesirable) {
  const char* fn = "kto::check_weights";
  detail::require(std::isfinite(desirable_weight) && desirable_weight >= 0, fn, "desirable_weight",
                  "be finite and >= 0", desirable_weight);
  detail::require(std::isfinite(undesirable_weight) && undesirable_weight >= 0, fn,
                  "undesirable_weight", "be finite and >= 0", undesirable_weight);
  detail::require(num_desirable >= 0, fn, "num_desirable", "be >= 0", num_desirable);
  detail::require(num_undesirable >= 0, fn, "num_undesirable", "be >= 0", num_undesirable);
  std::ostringstream os;
  const double denom = undesirable_weight * static_cast<double>(num_undesirable);
  const double numer = desirable_weight * static_cast<double>(num_desirable);
  if (num_desirable == 0 || num_undesirable == 0 || denom == 0.0) {
    os << "band does not apply: " << num_desirable << " desirable, " << num_undesirable
       << " undesirable examples, weights " << desirable_weight << "/" << undesirable_weight;
    return {NAN, true, os.str()};
  }
  const double ratio = numer / denom;
  const bool ok = ratio >= kWeightBandLow && ratio <= kWeightBandHigh * (1 + 1e-12);
  os << "lambda_D*n_D/(lambda_U*n_U) = " << ratio << (ok ? " is inside" : " is outside")
     << " the recommended band [1, 4/3]";
  if (!ok) {
    const ClassWeights p = propose_weights(num_desirable, num_undesirable);
    os << "; propose desirable_weight = " << p.desirable
       << ", undesirable_weight = " << p.undesirable;
  }
  return {ratio, ok, os.str()};
}

}  // namespace kto
