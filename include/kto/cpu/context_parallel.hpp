// cpu/context_parallel.hpp — a KTO step whose sequences are split over ranks by token.
//
// Context (sequence) parallel: each rank of a group holds a contiguous slice of
// every sequence's tokens — its rows of the logits and targets, with offsets
// that delimit each sequence's slice (a slice may be empty). A sequence's
// log-prob is a sum over its tokens, so each rank reduces its slice to partial
// sums, and one all-reduce over the group makes them whole on every rank:
//
//   1. local    ℓ_r, lse_r on this rank's rows → per sequence Σℓ, n_s
//               (and with token_statistics the entropy and mean-logit sums)
//   2. [SequenceAllReduce over the context-parallel group]     + a failure count
//   3. logp_s = Σℓ (or Σℓ / n_s with average_logprob), the KL partial
//               → [KlAllReduce over the data-parallel group, as kto_step's]
//   4. finish: z0, loss, metrics, g_s — identical on every rank of the group
//   5. backward on this rank's rows only: ∂L/∂Z[r] needs g_s, n_s and lse_r
//
// So the backward needs no communication, and the sums run in double whatever
// the logit type. The KL batch's log-probs must be whole on every rank (a
// caller with a token-sharded KL batch sums its sequence_logprobs() partials
// over the group first; average_logprob off, then divides). A rank that fails
// before a collective still joins it and every rank raises (kl_all_reduce.hpp's
// protocol, here for both collectives). Every rank must pass the same sequence
// count, reference log-probs, labels and options.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <sstream>
#include <vector>

#include "kto_step.hpp"

namespace kto {
namespace cpu {

/// Sums `count` doubles in place across the ranks of the context-parallel group
/// (MPI_Allreduce with MPI_SUM, torch.distributed.all_reduce, ...).
using SequenceAllReduce = std::function<void(double* values, index_t count)>;

namespace detail {

/// The values one rank contributes to the sequence all-reduce, for B sequences:
/// [Σℓ (B) | n (B) | entropy sums (B) | mean-logit sums (B), with token statistics |
/// failures (1)].
struct SequencePartials {
  index_t sequences = 0;
  bool statistics = false;
  std::vector<double> values;

  SequencePartials(index_t b, bool with_statistics)
      : sequences(b),
        statistics(with_statistics),
        values(static_cast<size_t>((with_statistics ? 4 : 2) * b + 1), 0.0) {}
  double& logp_sum(index_t s) { return values[static_cast<size_t>(s)]; }
  double& num_tokens(index_t s) { return values[static_cast<size_t>(sequences + s)]; }
  double& entropy_sum(index_t s) { return values[static_cast<size_t>(2 * sequences + s)]; }
  double& mean_logit_sum(index_t s) { return values[static_cast<size_t>(3 * sequences + s)]; }
  double& failures() { return values.back(); }
};

/// The forward of a context-parallel step, for the public entry point `fn`.
template <class T>
StepResult<accumulator_t<T>> context_parallel_forward_impl(
    const StepInputs<T>& in, const Options& o, const SequenceAllReduce& sequence_all_reduce,
    const ExecutionPolicy& exec, const KlAllReduce& kl_all_reduce, const char* fn,
    const LogitsView<T>* grad = nullptr) {
  using Acc = accumulator_t<T>;
  kto::detail::require(static_cast<bool>(sequence_all_reduce), fn, "sequence_all_reduce",
                       "be set: it sums across the context-parallel group", "an empty function");
  const index_t B = in.sequences.count > 0 ? in.sequences.count : 0;
  SequencePartials partials(B, o.token_statistics);
  SequenceForward<Acc> fwd;
  std::exception_ptr error;
  try {
    validate_options(o, fn);
    kto::detail::validate_logits(in.policy_logits, fn, "policy_logits");
    kto::detail::validate_sequences(in.sequences, in.policy_logits.rows.rows, fn, "sequences",
                                    false);
    kto::detail::validate_finish_inputs(in.sequences.count, in.reference_logp, in.desirable, o, fn,
                                        "sequences.count");
    if (grad) kto::detail::validate_gradient(*grad, in.policy_logits, fn);
    Options local = o;
    local.average_logprob = false;  // the mean needs the whole n_s: divided after the sum
    fwd = sequence_logprobs_impl<T>(in.policy_logits, in.targets, in.sequences, local, exec, fn,
                                    "policy_logits");
    // The partial sums from each row's ℓ_r, in double: the same terms a single process
    // adds, only split over ranks.
    for (index_t s = 0; s < B; ++s) {
      for (index_t r = in.sequences.begin(s); r < in.sequences.end(s); ++r)
        if (in.targets.at(r) != o.ignore_index)
          partials.logp_sum(s) += static_cast<double>(fwd.token_logp[static_cast<size_t>(r)]);
      partials.num_tokens(s) = static_cast<double>(fwd.num_tokens[static_cast<size_t>(s)]);
      if (o.token_statistics) {
        partials.entropy_sum(s) = fwd.token_statistics.entropy_sum[static_cast<size_t>(s)];
        partials.mean_logit_sum(s) = fwd.token_statistics.mean_logit_sum[static_cast<size_t>(s)];
      }
    }
  } catch (...) {
    error = std::current_exception();
    std::fill(partials.values.begin(), partials.values.end(), 0.0);
    partials.failures() = 1.0;
  }
  sequence_all_reduce(partials.values.data(), static_cast<index_t>(partials.values.size()));

  StepResult<Acc> out;
  const KlPartial kl = kto::detail::reduce_kl_or_fail(kl_all_reduce, fn, [&] {
    // A failure in this context-parallel group is raised inside the KL all-reduce's
    // protocol: the group's ranks still join it with a failure, so that their peers in
    // the other groups raise too instead of waiting in it.
    if (error) std::rethrow_exception(error);
    if (partials.failures() != 0.0) {
      std::ostringstream os;
      os << fn << ": " << partials.failures()
         << " context-parallel rank(s) failed before the sequence all-reduce; their own "
            "errors name the cause (this rank's inputs passed every check)";
      throw PeerError(fn, partials.failures(), os.str());
    }
    out.logp.assign(static_cast<size_t>(B), Acc(0));
    out.num_tokens.assign(static_cast<size_t>(B), 0);
    for (index_t s = 0; s < B; ++s) {
      const index_t n = static_cast<index_t>(partials.num_tokens(s));
      double sum = partials.logp_sum(s);
      if (o.average_logprob && n > 0) sum /= static_cast<double>(n);
      out.logp[static_cast<size_t>(s)] = static_cast<Acc>(sum);
      out.num_tokens[static_cast<size_t>(s)] = n;
      if (!(std::fabs(static_cast<double>(out.logp[static_cast<size_t>(s)])) <=
            kto::detail::kMaxLogprob))
        throw_sequence_overflow(fn, "policy_logits", s, in.sequences.begin(s), sum);
    }
    if (o.token_statistics) {
      for (index_t s = 0; s < B; ++s) {
        out.token_statistics.entropy_sum.push_back(partials.entropy_sum(s));
        out.token_statistics.mean_logit_sum.push_back(partials.mean_logit_sum(s));
      }
    }
    // The backward's one refusal that z0 does not decide, on the whole token counts.
    check_gradient_scale_bound<T>(in.desirable, make_span(out.num_tokens), o, fn);
    KlPartial local;
    if (uses_kl_batch(o))
      local = kto::detail::kl_partial_impl<Acc>(in.kl.policy_logp, in.kl.reference_logp,
                                                in.kl.num_tokens, o, fn);
    return local;
  });
  FinishResult<Acc> fin = kto::detail::finish_impl<Acc>(kl, make_span(out.logp), in.reference_logp,
                                                        in.desirable, o, fn, "sequences.count");
  out.metrics = fin.metrics;
  out.examples = std::move(fin.examples);
  out.row_lse = std::move(fwd.row_lse);
  return out;
}

}  // namespace detail

/// Forward half of a context-parallel step on this rank's slice of every sequence:
/// loss, metrics and per-example outputs of the whole sequences (the same on every
/// rank of the group), and this rank's row_lse. step_backward() with this result
/// gives this rank's rows of ∂L/∂logits.
template <class T>
StepResult<accumulator_t<T>> context_parallel_step_forward(
    const StepInputs<T>& in, const Options& o, const SequenceAllReduce& sequence_all_reduce,
    const ExecutionPolicy& exec = {}, const KlAllReduce& kl_all_reduce = {}) {
  return detail::context_parallel_forward_impl(in, o, sequence_all_reduce, exec, kl_all_reduce,
                                               "kto::cpu::context_parallel_step_forward");
}

/// The whole context-parallel step: the forward, then this rank's rows of
/// ∂L/∂logits into `grad` (which may be the logits themselves).
template <class T>
StepResult<accumulator_t<T>> context_parallel_kto_step(const StepInputs<T>& in, const Options& o,
                                                       const LogitsView<T>& grad,
                                                       const SequenceAllReduce& sequence_all_reduce,
                                                       const ExecutionPolicy& exec = {},
                                                       const KlAllReduce& kl_all_reduce = {}) {
  const char* fn = "kto::cpu::context_parallel_kto_step";
  auto out = detail::context_parallel_forward_impl(in, o, sequence_all_reduce, exec, kl_all_reduce,
                                                   fn, &grad);
  detail::backward_impl<T>(in.policy_logits, in.targets, in.sequences, make_span(out.row_lse),
                           make_span(out.examples.grad_logp), make_span(out.num_tokens), o, grad,
                           exec, fn, detail::ScaleCheck::done);
  return out;
}

}  // namespace cpu
}  // namespace kto
