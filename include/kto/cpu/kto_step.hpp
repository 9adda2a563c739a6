// cpu/kto_step.hpp — one whole KTO step on the CPU.
//
//   1. forward over the policy logits of the target batch → logp_s, lse_r
//   2. KL partial (S, C) from the KL batch's log-probs   → [all_reduce(S, C)]
//   3. finish: z0, ρ_s, loss, metrics, g_s
//   4. backward: ∂L/∂logits, into `grad` (which may be the logits themselves)
//
// The data-parallel form is the same code: pass an all_reduce callback that sums
// the two doubles of KlPartial across ranks (MPI_Allreduce, NCCL, gloo, ...).
// Callers who drive the phases themselves use sequence_logprobs(), kl_partial(),
// finish() and backward() directly.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "../finish.hpp"
#include "backward.hpp"
#include "sequence_logprobs.hpp"

namespace kto {
namespace cpu {

/// Log-probs of the KL batch (mismatched pairs), policy and reference, and the
/// token counts (needed for KlEstimator::nonempty_mean). Unused when the
/// reference point is not estimated from a KL batch.
template <class Acc>
struct KlInputs {
  Span<const Acc> policy_logp;
  Span<const Acc> reference_logp;
  Span<const index_t> num_tokens;
};

template <class T>
struct StepInputs {
  LogitsView<const T> policy_logits;  ///< target batch, policy model
  TargetsView targets;
  SequencesView sequences;                      ///< B ≥ 1 target examples
  Span<const accumulator_t<T>> reference_logp;  ///< B reference log-probs
  Span<const std::uint8_t> desirable;           ///< B labels: 1 desirable, 0 undesirable
  KlInputs<accumulator_t<T>> kl;
};

template <class Acc>
struct StepResult {
  Metrics metrics;
  std::vector<Acc> logp;  ///< policy logp_s
  std::vector<index_t> num_tokens;
  ExampleOutputs<Acc> examples;  ///< ρ_s, βρ_s, loss_s, g_s
};

/// Sums a KlPartial across data-parallel ranks in place.
using KlAllReduce = std::function<void(KlPartial&)>;

template <class T>
StepResult<accumulator_t<T>> kto_step(const StepInputs<T>& in, const Options& o,
                                      const LogitsView<T>& grad, const ExecutionPolicy& exec = {},
                                      const KlAllReduce& all_reduce = {}) {
  using Acc = accumulator_t<T>;
  const char* fn = "kto::cpu::kto_step";
  validate_options(o, fn);
  kto::detail::validate_logits(in.policy_logits, fn, "policy_logits");
  kto::detail::validate_sequences(in.sequences, in.policy_logits.rows.rows, fn, "sequences", false);
  kto::detail::validate_gradient(grad, in.policy_logits, fn);

  SequenceForward<Acc> fwd =
      sequence_logprobs<T>(in.policy_logits, in.targets, in.sequences, o, exec);
  KlPartial kl;
  if (uses_kl_batch(o))
    kl = kl_partial<Acc>(in.kl.policy_logp, in.kl.reference_logp, in.kl.num_tokens, o);
  if (all_reduce) all_reduce(kl);
  FinishResult<Acc> fin = finish<Acc>(kl, make_span(fwd.logp), in.reference_logp, in.desirable, o);
  backward<T>(in.policy_logits, in.targets, in.sequences, make_span(fwd.row_lse),
              make_span(fin.examples.grad_logp), make_span(fwd.num_tokens), o, grad, exec);

  StepResult<Acc> out;
  out.metrics = fin.metrics;
  out.logp = std::move(fwd.logp);
  out.num_tokens = std::move(fwd.num_tokens);
  out.examples = std::move(fin.examples);
  return out;
}

}  // namespace cpu
}  // namespace kto
