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
#include <cstddef>
#include <string>

#include "config.hpp"
#include "error.hpp"
#include "logit_transform.hpp"

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
  /// `entropy` and `logits/*` metrics (CPU and CUDA paths).
  bool token_statistics = false;
  /// The transform the model applies to its logits before the softmax
  /// (logit_transform.hpp): z' = c·tanh(a·z / c) / τ, or a·z / τ when c = 0,
  /// applied to the logits every path reads (the fused step's raw hidden·Wᵀ + b,
  /// or the logits a caller passes untransformed); gradients are to the raw
  /// logits. The identity (the default) costs nothing (CPU and CUDA paths).
  double logit_scale = 1.0;    ///< a
  double logit_softcap = 0.0;  ///< c (0: no soft-cap)
  double temperature = 1.0;    ///< τ
};

inline LogitTransform logit_transform(const Options& o) {
  return LogitTransform{o.logit_scale, o.logit_softcap, o.temperature};
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
  // Bounded like β: |∂z'/∂z| <= |a| / τ <= 1e12 keeps every gradient finite.
  detail::require(
      std::isfinite(o.logit_scale) && o.logit_scale != 0.0 && std::fabs(o.logit_scale) <= kMaxScale,
      function, "options.logit_scale", "be finite, nonzero and |a| <= 1e6", o.logit_scale);
  detail::require(
      std::isfinite(o.logit_softcap) && o.logit_softcap >= 0.0 && o.logit_softcap <= kMaxScale,
      function, "options.logit_softcap", "be finite, >= 0 (0: off) and <= 1e6", o.logit_softcap);
  detail::require(std::isfinite(o.temperature) && o.temperature >= 1.0 / kMaxScale &&
                      o.temperature <= kMaxScale,
                  function, "options.temperature", "be finite, in [1e-6, 1e6]", o.temperature);
}

/// The binding contract for options: one array of kOptionCount numbers, in the
/// order of OptionIndex and named by kOptionNames (enums as their codes, flags
/// as 0 or 1, integers exactly). A binding passes this one array to every op;
/// options_from_array() checks it and builds Options, so a new option changes
/// no binding's signature.
enum OptionIndex : int {
  kOptionBeta = 0,
  kOptionDesirableWeight,
  kOptionUndesirableWeight,
  kOptionLossType,
  kOptionLink,
  kOptionReferencePoint,
  kOptionKlEstimator,
  kOptionClampKl,
  kOptionFixedZ0,
  kOptionAverageLogprob,
  kOptionReduction,
  kOptionMeanDenominator,
  kOptionIgnoreIndex,
  kOptionTokenStatistics,
  kOptionLogitScale,
  kOptionLogitSoftcap,
  kOptionTemperature,
  kOptionCount
};
constexpr const char* kOptionNames[kOptionCount] = {
    "beta",         "desirable_weight", "undesirable_weight", "loss_type",
    "link",         "reference_point",  "kl_estimator",       "clamp_kl",
    "fixed_z0",     "average_logprob",  "reduction",          "mean_denominator",
    "ignore_index", "token_statistics", "logit_scale",        "logit_softcap",
    "temperature"};

/// The names of an enum option's values, indexed by their codes: the strings the
/// bindings accept (`loss_type="kto"`), spelled here once. Empty (count 0) for the
/// options that are numbers or flags.
struct OptionChoices {
  const char* const* names;
  int count;
};
inline constexpr const char* kLossTypeNames[] = {"kto", "apo_zero_unpaired"};
inline constexpr const char* kLinkNames[] = {"one_minus_sigmoid", "neg_log_sigmoid"};
inline constexpr const char* kReferencePointNames[] = {"kl_batch", "fixed", "zero"};
inline constexpr const char* kKlEstimatorNames[] = {"mean", "nonempty_mean"};
inline constexpr const char* kReductionNames[] = {"mean", "sum"};

namespace detail {
template <std::size_t N>
constexpr OptionChoices choices(const char* const (&names)[N]) {
  return {names, static_cast<int>(N)};
}
}  // namespace detail

constexpr OptionChoices option_choices(int option) {
  switch (option) {
    case kOptionLossType:
      return detail::choices(kLossTypeNames);
    case kOptionLink:
      return detail::choices(kLinkNames);
    case kOptionReferencePoint:
      return detail::choices(kReferencePointNames);
    case kOptionKlEstimator:
      return detail::choices(kKlEstimatorNames);
    case kOptionReduction:
      return detail::choices(kReductionNames);
    default:
      return {nullptr, 0};
  }
}

inline void options_to_array(const Options& o, double* out) {
  out[kOptionBeta] = o.beta;
  out[kOptionDesirableWeight] = o.desirable_weight;
  out[kOptionUndesirableWeight] = o.undesirable_weight;
  out[kOptionLossType] = static_cast<double>(o.loss_type);
  out[kOptionLink] = static_cast<double>(o.link);
  out[kOptionReferencePoint] = static_cast<double>(o.reference_point);
  out[kOptionKlEstimator] = static_cast<double>(o.kl_estimator);
  out[kOptionClampKl] = o.clamp_kl ? 1.0 : 0.0;
  out[kOptionFixedZ0] = o.fixed_z0;
  out[kOptionAverageLogprob] = o.average_logprob ? 1.0 : 0.0;
  out[kOptionReduction] = static_cast<double>(o.reduction);
  out[kOptionMeanDenominator] = static_cast<double>(o.mean_denominator);
  out[kOptionIgnoreIndex] = static_cast<double>(o.ignore_index);
  out[kOptionTokenStatistics] = o.token_statistics ? 1.0 : 0.0;
  out[kOptionLogitScale] = o.logit_scale;
  out[kOptionLogitSoftcap] = o.logit_softcap;
  out[kOptionTemperature] = o.temperature;
}

/// Options from the binding contract's array (see OptionIndex), for the public
/// entry point `fn`: the count, every code and flag and integer are checked
/// (then validate_options()); errors name "options.<name>".
inline Options options_from_array(const double* values, index_t count, const char* fn) {
  detail::require(count == kOptionCount, fn, "options",
                  "hold kOptionCount = " + std::to_string(kOptionCount) + " values", count);
  auto integer = [&](int k, double lo, double hi) {
    const double v = values[k];
    detail::require(std::isfinite(v) && v == std::floor(v) && v >= lo && v <= hi, fn,
                    std::string("options.") + kOptionNames[k],
                    "be a whole number in [" + std::to_string(static_cast<long long>(lo)) + ", " +
                        std::to_string(static_cast<long long>(hi)) + "]",
                    v);
    return v;
  };
  auto flag = [&](int k) { return integer(k, 0, 1) != 0.0; };
  auto code = [&](int k) { return static_cast<int>(integer(k, 0, option_choices(k).count - 1)); };
  constexpr double kLargestExact = 9007199254740992.0;  // 2^53: integers a double holds exactly
  Options o;
  o.beta = values[kOptionBeta];
  o.desirable_weight = values[kOptionDesirableWeight];
  o.undesirable_weight = values[kOptionUndesirableWeight];
  o.loss_type = static_cast<LossType>(code(kOptionLossType));
  o.link = static_cast<Link>(code(kOptionLink));
  o.reference_point = static_cast<ReferencePoint>(code(kOptionReferencePoint));
  o.kl_estimator = static_cast<KlEstimator>(code(kOptionKlEstimator));
  o.clamp_kl = flag(kOptionClampKl);
  o.fixed_z0 = values[kOptionFixedZ0];
  o.average_logprob = flag(kOptionAverageLogprob);
  o.reduction = static_cast<Reduction>(code(kOptionReduction));
  o.mean_denominator =
      static_cast<index_t>(integer(kOptionMeanDenominator, -kLargestExact, kLargestExact));
  o.ignore_index = static_cast<index_t>(integer(kOptionIgnoreIndex, -kLargestExact, kLargestExact));
  o.token_statistics = flag(kOptionTokenStatistics);
  o.logit_scale = values[kOptionLogitScale];
  o.logit_softcap = values[kOptionLogitSoftcap];
  o.temperature = values[kOptionTemperature];
  validate_options(o, fn);
  return o;
}

}  // namespace kto
