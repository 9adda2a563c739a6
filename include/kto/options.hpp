// options.hpp — every knob of the KTO loss, as one plain struct.
//
//   loss_s = λ_D f(β(ρ_s − z0))   desirable
//            λ_U f(β(z0 − ρ_s))   undesirable
//   f(u)   = 1 − σ(u)  (link = one_minus_sigmoid, TRL and the paper)
//          = −log σ(u) (link = neg_log_sigmoid)
//   z0     = max(0, S / C) over the KL batch (reference_point = kl_batch),
//            a caller-given constant (fixed) or 0 (zero).
//   apo_zero_unpaired: desirable λ_D(1 − σ(βρ)), undesirable λ_U σ(βρ), which is
//   the kto formula with z0 = 0; the KL batch is then not used.
//
// The struct is trivially copyable so the same value travels to a CUDA kernel.
#pragma once

#include <cmath>
#include <string>

#include "config.hpp"
#include "error.hpp"

namespace kto {

enum class LossType : int { kto = 0, apo_zero_unpaired = 1 };
enum class Link : int { one_minus_sigmoid = 0, neg_log_sigmoid = 1 };
enum class ReferencePoint : int { kl_batch = 0, fixed = 1, zero = 2 };
/// mean: C counts every KL example (TRL). nonempty_mean: only those with ≥ 1
/// non-ignored token (the paper authors' code).
enum class KlEstimator : int { mean = 0, nonempty_mean = 1 };
enum class Reduction : int { mean = 0, sum = 1 };

struct Options {
  double beta = 0.1;
  double desirable_weight = 1.0;    ///< λ_D
  double undesirable_weight = 1.0;  ///< λ_U
  LossType loss_type = LossType::kto;
  Link link = Link::one_minus_sigmoid;
  ReferencePoint reference_point = ReferencePoint::kl_batch;
  KlEstimator kl_estimator = KlEstimator::mean;
  bool clamp_kl = true;   ///< z0 = max(0, S/C); off: z0 = S/C
  double fixed_z0 = 0.0;  ///< used when reference_point == fixed
  /// Sequence log-prob is the mean over its non-ignored tokens instead of the sum.
  bool average_logprob = false;
  Reduction reduction = Reduction::mean;
  /// Divisor of the mean reduction; 0 means the number of target examples in the
  /// call. Data-parallel callers who sum (not average) gradients across ranks set
  /// it to the global batch size.
  index_t mean_denominator = 0;
  index_t ignore_index = -100;
  /// Also return, per sequence, the sums of its scored tokens' entropy and mean
  /// logit (token_statistics.hpp), from the pass that computes lse: TRL's
  /// `entropy` and `logits/*` metrics. Not on CUDA yet (its entry points raise).
  bool token_statistics = false;
};

/// Options from plain numbers, the enums as their integer values: what
/// language bindings receive. Invalid codes are caught by validate_options().
inline Options options_from_codes(double beta, double desirable_weight, double undesirable_weight,
                                  int loss_type, int link, int reference_point, int kl_estimator,
                                  bool clamp_kl, double fixed_z0, bool average_logprob,
                                  int reduction, index_t mean_denominator, index_t ignore_index,
                                  bool token_statistics = false) {
  Options o;
  o.beta = beta;
  o.desirable_weight = desirable_weight;
  o.undesirable_weight = undesirable_weight;
  o.loss_type = static_cast<LossType>(loss_type);
  o.link = static_cast<Link>(link);
  o.reference_point = static_cast<ReferencePoint>(reference_point);
  o.kl_estimator = static_cast<KlEstimator>(kl_estimator);
  o.clamp_kl = clamp_kl;
  o.fixed_z0 = fixed_z0;
  o.average_logprob = average_logprob;
  o.reduction = static_cast<Reduction>(reduction);
  o.mean_denominator = mean_denominator;
  o.ignore_index = ignore_index;
  o.token_statistics = token_statistics;
  return o;
}

/// True when z0 is estimated from a KL batch (and so a KL batch is needed).
KTO_HOST_DEVICE inline bool uses_kl_batch(const Options& o) {
  return o.loss_type == LossType::kto && o.reference_point == ReferencePoint::kl_batch;
}

/// Largest β, λ_D and λ_U accepted: their product (≤ 1e12) times σ' ≤ 1/4 keeps
/// every gradient finite in fp32 with room to spare (TRL uses β ≤ 1, λ ≈ 1).
constexpr double kMaxScale = 1e6;

/// Throws kto::Error naming the first invalid field.
inline void validate_options(const Options& o, const char* function) {
  // Bounded so that λ·β, and with it every gradient, stays far from fp32 overflow.
  detail::require(std::isfinite(o.beta) && o.beta > 0 && o.beta <= kMaxScale, function,
                  "options.beta", "be finite, > 0 and <= 1e6", o.beta);
  detail::require(std::isfinite(o.desirable_weight) && o.desirable_weight >= 0 &&
                      o.desirable_weight <= kMaxScale,
                  function, "options.desirable_weight", "be finite, >= 0 and <= 1e6",
                  o.desirable_weight);
  detail::require(std::isfinite(o.undesirable_weight) && o.undesirable_weight >= 0 &&
                      o.undesirable_weight <= kMaxScale,
                  function, "options.undesirable_weight", "be finite, >= 0 and <= 1e6",
                  o.undesirable_weight);
  detail::require(o.loss_type == LossType::kto || o.loss_type == LossType::apo_zero_unpaired,
                  function, "options.loss_type", "be kto or apo_zero_unpaired",
                  static_cast<int>(o.loss_type));
  detail::require(o.link == Link::one_minus_sigmoid || o.link == Link::neg_log_sigmoid, function,
                  "options.link", "be one_minus_sigmoid or neg_log_sigmoid",
                  static_cast<int>(o.link));
  detail::require(o.reference_point == ReferencePoint::kl_batch ||
                      o.reference_point == ReferencePoint::fixed ||
                      o.reference_point == ReferencePoint::zero,
                  function, "options.reference_point", "be kl_batch, fixed or zero",
                  static_cast<int>(o.reference_point));
  detail::require(
      o.kl_estimator == KlEstimator::mean || o.kl_estimator == KlEstimator::nonempty_mean, function,
      "options.kl_estimator", "be mean or nonempty_mean", static_cast<int>(o.kl_estimator));
  detail::require(o.reduction == Reduction::mean || o.reduction == Reduction::sum, function,
                  "options.reduction", "be mean or sum", static_cast<int>(o.reduction));
  detail::require(std::fabs(o.fixed_z0) <= 1e15, function, "options.fixed_z0",
                  "be finite, |z0| <= 1e15 (a log-ratio)", o.fixed_z0);
  detail::require(o.mean_denominator >= 0, function, "options.mean_denominator",
                  "be >= 0 (0 = number of target examples)", o.mean_denominator);
}

}  // namespace kto
