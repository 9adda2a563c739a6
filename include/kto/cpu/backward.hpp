// cpu/backward.hpp — the gradient of the KTO loss w.r.t. the policy logits.
//
//   ∂L/∂Z[r, v] = g_s · c_r · (1[v = t_r] − exp(Z'[r, v] − lse_r)) · ∂Z'/∂Z
//
// (Z' = Z and ∂Z'/∂Z = 1 unless options carry a logit transform, logit_transform.hpp)
// with g_s = ∂L/∂logp_s from finish(), c_r = 1 (sum) or 1/n_s (average) on
// scored rows. Ignored rows and rows outside every sequence get all zeros, so
// every element of the output is written. One read of the logits and one write
// of the gradient, in the logit type; `grad` may alias `logits` exactly (in place).
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "../example_loss.hpp"
#include "../layout.hpp"
#include "../options.hpp"
#include "../validate.hpp"
#include "parallel.hpp"
#include "row_kernels.hpp"
#include "sequence_logprobs.hpp"

namespace kto {
namespace cpu {

namespace detail {

/// The logit type's name in messages.
template <class T>
const char* logit_type_name() {
  if (std::is_same<T, double>::value) return "double";
  if (std::is_same<T, float>::value) return "float";
  if (std::is_same<T, Eigen::half>::value) return "half";
  return "bfloat16";
}

/// The largest value of the logit type, which every element of ∂L/∂logits must fit.
template <class T>
double logit_type_max() {
  return static_cast<double>(std::numeric_limits<T>::max());
}

/// The gradient is written in the logit type, and |∂L/∂Z[r, v]| <= |g_s c_r| |a| / τ
/// must fit it (half: 65504). Before the collective z0, and so g_s, is unknown: a step
/// checks the largest |g_s c_r| |a| / τ any z0 can give (grad_logp_bound()), and names
/// options.beta and the logit type. Needs only the labels and each sequence's token count.
template <class T>
void check_gradient_scale_bound(Span<const std::uint8_t> desirable, Span<const index_t> num_tokens,
                                const Options& o, const char* fn) {
  const double highest = logit_type_max<T>();
  const double reduction = reduction_scale(o, desirable.size);
  const double derivative = logit_transform(o).max_derivative();
  for (index_t s = 0; s < desirable.size; ++s) {
    if (num_tokens[s] < 1) continue;  // no scored row, no gradient
    const double bound = token_scale(grad_logp_bound(desirable[s] != 0, o, reduction),
                                     num_tokens[s], o.average_logprob) *
                         derivative;
    if (bound <= highest) continue;
    std::ostringstream expectation, got;
    expectation << "keep every element of the " << logit_type_name<T>()
                << " logits' gradient within the " << logit_type_name<T>() << " range (" << highest
                << ") whatever z0: the largest, lambda*beta*max|f'|*c_r*|a|/tau/B, is " << bound
                << " for sequence " << s
                << " (lower options.beta or the weights, or use a wider logit type)";
    got << o.beta << " with " << logit_type_name<T>() << " logits";
    kto::detail::fail(fn, "options.beta", expectation.str(), got.str());
  }
}

/// Which argument backward_impl() names when a sequence's gradient scale does not fit
/// the logit type: grad_logp[s] (kto::cpu::backward), the cotangent (step_backward, which
/// passes it for the message), or none (kto_step: its check_gradient_scale_bound() ran
/// before the collective).
enum class ScaleCheck { grad_logp, cotangent, done };

/// backward() as called by the public entry point `fn`.
template <class T>
void backward_impl(const LogitsView<const T>& logits, const TargetsView& targets,
                   const SequencesView& seqs, Span<const accumulator_t<T>> row_lse,
                   Span<const accumulator_t<T>> grad_logp, Span<const index_t> num_tokens,
                   const Options& o, const LogitsView<T>& grad, const ExecutionPolicy& exec,
                   const char* fn, ScaleCheck scale_check = ScaleCheck::grad_logp,
                   double cotangent = 1.0) {
  using Acc = accumulator_t<T>;
  kto::detail::validate_logits(logits, fn, "logits");
  detail::validate_forward_inputs(fn, logits.rows.rows, logits.vocab, targets, seqs, o, true);
  kto::detail::validate_gradient(grad, logits, fn);
  kto::detail::validate_span(row_lse, logits.rows.rows, fn, "row_lse");
  kto::detail::validate_span(grad_logp, seqs.count, fn, "grad_logp");
  kto::detail::validate_span(num_tokens, seqs.count, fn, "num_tokens");
  kto::detail::validate_finite(grad_logp, fn, "grad_logp");

  const LogitTransform transform = logit_transform(o);
  const index_t first = seqs.offsets[0];
  const index_t last = seqs.offsets[seqs.count];
  // The residuals of scored rows, checked before anything is written.
  for (index_t s = 0; s < seqs.count; ++s) {
    for (index_t r = seqs.begin(s); r < seqs.end(s); ++r) {
      if (targets.at(r) == o.ignore_index) continue;
      if (!std::isfinite(static_cast<double>(row_lse[r])))
        kto::detail::fail(fn, "row_lse[" + std::to_string(r) + "]",
                          "be finite on scored rows (the forward's lse)", row_lse[r]);
      kto::detail::require(num_tokens[s] >= 1, fn, "num_tokens[" + std::to_string(s) + "]",
                           "be >= 1 for a sequence with scored rows", num_tokens[s]);
      if (scale_check == ScaleCheck::done) continue;
      // |∂L/∂Z| <= |g_s c_r| |a| / τ: written in T, it must fit T (half: 65504).
      const double scale =
          token_scale(static_cast<double>(grad_logp[s]), num_tokens[s], o.average_logprob) *
          transform.max_derivative();
      const double highest = logit_type_max<T>();
      if (std::fabs(scale) <= highest) continue;
      std::ostringstream expectation;
      expectation << "keep the gradient scale |g_s c_r| |a| / tau of sequence " << s
                  << " within the " << logit_type_name<T>() << " logits' range (" << highest
                  << "); it is " << scale;
      if (scale_check == ScaleCheck::cotangent) {
        expectation << " (lower the cotangent, options.beta or the weights, or use a wider "
                       "logit type)";
        kto::detail::fail(fn, "cotangent", expectation.str(), cotangent);
      }
      expectation << " (lower beta or the weights, or use a wider logit type)";
      kto::detail::fail(fn, "grad_logp[" + std::to_string(s) + "]", expectation.str(),
                        grad_logp[s]);
    }
  }
  parallel_for(logits.rows.rows, exec, [&](index_t b, index_t e) {
    index_t s = b >= first && b < last ? detail::sequence_of_row(seqs, b) : -1;
    for (index_t r = b; r < e; ++r) {
      T* out = grad.row(r);
      if (r < first || r >= last) {
        zero_row(out, grad.vocab);
        continue;
      }
      while (r >= seqs.end(s)) ++s;  // skips empty sequences too
      const index_t t = targets.at(r);
      if (t == o.ignore_index) {
        zero_row(out, grad.vocab);
        continue;
      }
      const Acc scale = static_cast<Acc>(
          token_scale(static_cast<double>(grad_logp[s]), num_tokens[s], o.average_logprob));
      row_gradient<T, Acc>(logits.row(r), logits.vocab, t, row_lse[r], scale, out, transform);
    }
  });
}

}  // namespace detail

template <class T>
void backward(const LogitsView<const T>& logits, const TargetsView& targets,
              const SequencesView& seqs, Span<const accumulator_t<T>> row_lse,
              Span<const accumulator_t<T>> grad_logp, Span<const index_t> num_tokens,
              const Options& o, const LogitsView<T>& grad, const ExecutionPolicy& exec = {}) {
  detail::backward_impl(logits, targets, seqs, row_lse, grad_logp, num_tokens, o, grad, exec,
                        "kto::cpu::backward");
}

}  // namespace cpu
}  // namespace kto
