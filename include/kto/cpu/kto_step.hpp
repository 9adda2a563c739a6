// cpu/kto_step.hpp — one whole KTO step on the CPU.
//
//   1. forward over the policy logits of the target batch → logp_s, lse_r
//   2. KL partial (S, C) from the KL batch's log-probs   → [all_reduce(S, C)]
//   3. finish: z0, ρ_s, loss, metrics, g_s
//   4. backward: ∂L/∂logits, into `grad` (which may be the logits themselves)
//
// The data-parallel form is the same code: pass an all_reduce callback that sums
// the three doubles of KlPartial across ranks (MPI_Allreduce, NCCL, gloo, ...).
// Callers who drive the phases themselves use sequence_logprobs(), kl_partial(),
// finish() and backward() directly.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <sstream>
#include <vector>

#include "../finish.hpp"
#include "../kl_all_reduce.hpp"
#include "backward.hpp"
#include "sequence_logprobs.hpp"

namespace kto {
namespace cpu {

/// Log-probs of the KL batch (mismatched pairs), policy and reference, and the
/// token counts (needed for KlEstimator::nonempty_mean). Unused when the
/// reference point is not estimated from a KL batch. The two log-prob arrays
/// are distinct types (model_logp.hpp): {kto::policy_logp(p), kto::reference_logp(r), n}.
template <class Acc>
struct KlInputs {
  PolicyLogp<Acc> policy_logp;
  ReferenceLogp<Acc> reference_logp;
  Span<const index_t> num_tokens;
};

template <class T>
struct StepInputs {
  LogitsView<const T> policy_logits;  ///< target batch, policy model
  TargetsView targets;
  SequencesView sequences;                         ///< B ≥ 1 target examples
  ReferenceLogp<accumulator_t<T>> reference_logp;  ///< B reference log-probs
  Span<const std::uint8_t> desirable;              ///< B labels: 1 desirable, 0 undesirable
  KlInputs<accumulator_t<T>> kl;
};

template <class Acc>
struct StepResult {
  Metrics metrics;
  std::vector<Acc> logp;  ///< policy logp_s
  std::vector<index_t> num_tokens;
  ExampleOutputs<Acc> examples;  ///< ρ_s, βρ_s, loss_s, g_s
  std::vector<Acc> row_lse;      ///< lse_r per row (0 where not scored): the backward's residual
  SequenceTokenStatistics token_statistics;  ///< with Options::token_statistics
};

using kto::KlAllReduce;

namespace detail {

/// step_forward() as called by the public entry point `fn`.
template <class T>
StepResult<accumulator_t<T>> step_forward_impl(const StepInputs<T>& in, const Options& o,
                                               const ExecutionPolicy& exec,
                                               const KlAllReduce& all_reduce, const char* fn,
                                               const LogitsView<T>* grad = nullptr) {
  using Acc = accumulator_t<T>;
  SequenceForward<Acc> fwd;
  // Everything that can fail runs before the collective (kl_all_reduce.hpp).
  const KlPartial kl = kto::detail::reduce_kl_or_fail(all_reduce, fn, [&] {
    validate_options(o, fn);
    kto::detail::validate_logits(in.policy_logits, fn, "policy_logits");
    kto::detail::validate_sequences(in.sequences, in.policy_logits.rows.rows, fn, "sequences",
                                    false);
    kto::detail::validate_finish_inputs(in.sequences.count, in.reference_logp, in.desirable, o, fn,
                                        "sequences.count");
    if (grad) kto::detail::validate_gradient(*grad, in.policy_logits, fn);
    KlPartial local;
    if (uses_kl_batch(o))
      local = kto::detail::kl_partial_impl<Acc>(in.kl.policy_logp, in.kl.reference_logp,
                                                in.kl.num_tokens, o, fn);
    fwd = sequence_logprobs_impl<T>(in.policy_logits, in.targets, in.sequences, o, exec, fn,
                                    "policy_logits");
    // The backward's one refusal that z0 does not decide, made here for any z0.
    check_gradient_scale_bound<T>(in.desirable, make_span(fwd.num_tokens), o, fn);
    return local;
  });
  FinishResult<Acc> fin = kto::detail::finish_impl<Acc>(kl, make_span(fwd.logp), in.reference_logp,
                                                        in.desirable, o, fn, "sequences.count");
  StepResult<Acc> out;
  out.metrics = fin.metrics;
  out.logp = std::move(fwd.logp);
  out.num_tokens = std::move(fwd.num_tokens);
  out.examples = std::move(fin.examples);
  out.row_lse = std::move(fwd.row_lse);
  out.token_statistics = std::move(fwd.token_statistics);
  return out;
}

}  // namespace detail

/// Forward half of a step: loss, metrics, per-example outputs and the residual
/// row_lse, no gradient. With `all_reduce`, every check and the forward run
/// before the collective, and a failure on any rank raises on every rank. That
/// includes the backward's check that the gradient fits the logit type (half:
/// 65504) for a cotangent of 1, whatever z0 (check_gradient_scale_bound()).
template <class T>
StepResult<accumulator_t<T>> step_forward(const StepInputs<T>& in, const Options& o,
                                          const ExecutionPolicy& exec = {},
                                          const KlAllReduce& all_reduce = {}) {
  return detail::step_forward_impl(in, o, exec, all_reduce, "kto::cpu::step_forward");
}

/// Backward half: ∂L/∂logits from step_forward()'s result, into `grad` (which
/// may be the logits themselves). `cotangent` scales the loss (1 for L itself);
/// a cotangent that takes some g_s past the accumulation type, or the gradient
/// past the logit type, is refused by name.
template <class T>
void step_backward(const StepInputs<T>& in, const StepResult<accumulator_t<T>>& fwd,
                   const Options& o, const LogitsView<T>& grad, const ExecutionPolicy& exec = {},
                   double cotangent = 1.0) {
  using Acc = accumulator_t<T>;
  const char* fn = "kto::cpu::step_backward";
  kto::detail::require(std::isfinite(cotangent), fn, "cotangent", "be finite", cotangent);
  kto::detail::validate_finite(make_span(fwd.examples.grad_logp), fn, "fwd.examples.grad_logp");
  std::vector<Acc> grad_logp(fwd.examples.grad_logp);
  for (size_t s = 0; s < grad_logp.size(); ++s) {
    const double g = static_cast<double>(grad_logp[s]);
    grad_logp[s] = static_cast<Acc>(g * cotangent);
    if (!std::isfinite(static_cast<double>(grad_logp[s]))) {
      std::ostringstream expectation;
      expectation << "keep cotangent * g_s finite in the accumulation type (g_" << s << " = " << g
                  << ")";
      kto::detail::fail(fn, "cotangent", expectation.str(), cotangent);
    }
  }
  detail::backward_impl<T>(in.policy_logits, in.targets, in.sequences, make_span(fwd.row_lse),
                           make_span(grad_logp), make_span(fwd.num_tokens), o, grad, exec, fn,
                           detail::ScaleCheck::cotangent, cotangent);
}

/// The whole step: step_forward, then the gradient into `grad`. Arguments are
/// all checked before anything is written.
template <class T>
StepResult<accumulator_t<T>> kto_step(const StepInputs<T>& in, const Options& o,
                                      const LogitsView<T>& grad, const ExecutionPolicy& exec = {},
                                      const KlAllReduce& all_reduce = {}) {
  const char* fn = "kto::cpu::kto_step";
  auto out = detail::step_forward_impl(in, o, exec, all_reduce, fn, &grad);
  // Nothing in the backward can refuse now: its gradient-scale check ran before the
  // collective (step_forward_impl), for any z0.
  detail::backward_impl<T>(in.policy_logits, in.targets, in.sequences, make_span(out.row_lse),
                           make_span(out.examples.grad_logp), make_span(out.num_tokens), o, grad,
                           exec, fn, detail::ScaleCheck::done);
  return out;
}

}  // namespace cpu
}  // namespace kto
