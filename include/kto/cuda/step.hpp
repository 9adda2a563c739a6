// cuda/step.hpp — the KTO step on a CUDA stream, CUB style.
//
//   kto_step           the four phases of phases.hpp for one process (with an
//                      optional all-reduce hook between the KL partial and the
//                      finish): forward, KL forward and partial, finish, backward
//   step_forward,      its two halves, the twins of kto::cpu::step_forward /
//   step_backward      step_backward, for trainers whose autograd splits them
//
// Conventions: every pointer is a device pointer; nothing allocates or
// synchronises; every call is stream-ordered and safe under CUDA graph
// capture. Calls that need scratch take (workspace, workspace_bytes): pass a
// null workspace to learn the size, then call again with at least that many
// bytes (256-byte aligned, as cudaMalloc returns). Errors that only the device
// can see are recorded in the workspace; read_status() reports them.
// Requires nvcc: include this header from .cu files.
#pragma once

#include <functional>

#include "phases.hpp"

namespace kto {
namespace cuda {

// ------------------------------------------------------------ whole step --

template <class T>
struct StepInputs {
  LogitsView<const T> policy_logits;  ///< target batch, policy model
  TargetsView targets;
  SequencesView sequences;              ///< B ≥ 1 target examples (device offsets)
  ReferenceLogp<float> reference_logp;  ///< B, kto::reference_logp(device pointer, B)
  const std::uint8_t* desirable;        ///< B labels, 1 desirable / 0 undesirable
  /// The KL batch: either its policy logits (forwarded inside the step) or its
  /// precomputed policy log-probs; its reference log-probs always.
  struct Kl {
    LogitsView<const T> logits;  ///< data == nullptr: use policy_logp
    TargetsView targets;
    SequencesView sequences;
    PolicyLogp<float> policy_logp;        ///< without logits: K precomputed log-probs
    const index_t* num_tokens = nullptr;  ///< with policy_logp, for nonempty_mean
    ReferenceLogp<float> reference_logp;  ///< K: policy_logp.size or sequences.count
  } kl;
};

/// Device outputs; metrics is required, a null array stays in the workspace.
/// step_forward() also needs the backward's residuals: row_lse (one per logits
/// row), num_tokens and examples.grad_logp.
struct StepOutputs {
  Metrics* metrics = nullptr;
  float* logp = nullptr;
  index_t* num_tokens = nullptr;
  ExampleOutputs examples;
  float* row_lse = nullptr;  ///< lse_r per row: the backward's residual
  /// Required with options.token_statistics (target batch only).
  SequenceTokenStatistics token_statistics;
};

/// Sums the KlPartial (three doubles, device memory: S, C and the failed
/// ranks) across ranks on `stream`, e.g. ncclAllReduce(p, p, 3, ncclFloat64,
/// ncclSum, comm, stream). A rank whose kernels recorded an error contributes
/// failures = 1, so the others' read_status reports StatusCode::peer_failure.
/// The twin of kto::cpu::KlAllReduce (kl_all_reduce.hpp), which sums on the host
/// in place and raises instead.
using KlAllReduce = std::function<Status(KlPartial* device_partial, cudaStream_t stream)>;

namespace detail {

template <class T>
index_t kl_count(const StepInputs<T>& in) {
  return in.kl.logits.data ? in.kl.sequences.count : in.kl.policy_logp.size;
}

/// The scratch every step carves for a target batch of `rows` rows and B examples
/// and a KL batch of `kl_rows` rows and K examples; the error word first (read_status
/// reads it at the workspace's start).
struct BatchBuffers {
  device::DeviceErrors* errors;
  KlPartial* partial;
  float *row_lse, *token_logp, *row_entropy, *row_mean_logit, *kl_row_lse, *kl_token_logp;
  float *logp, *ratio, *reward, *loss, *grad_logp, *kl_logp;
  index_t *num_tokens, *kl_num_tokens;

  static BatchBuffers carve(Carver& c, index_t rows, index_t B, index_t kl_rows, index_t K) {
    BatchBuffers b;
    b.errors = c.take<device::DeviceErrors>(1);
    b.partial = c.take<KlPartial>(1);
    b.row_lse = c.take<float>(rows);
    b.token_logp = c.take<float>(rows);
    b.row_entropy = c.take<float>(rows);  // options.token_statistics only: 8 bytes a row
    b.row_mean_logit = c.take<float>(rows);
    b.kl_row_lse = c.take<float>(kl_rows);
    b.kl_token_logp = c.take<float>(kl_rows);
    b.logp = c.take<float>(B);
    b.num_tokens = c.take<index_t>(B);
    b.ratio = c.take<float>(B);
    b.reward = c.take<float>(B);
    b.loss = c.take<float>(B);
    b.grad_logp = c.take<float>(B);
    b.kl_logp = c.take<float>(K);
    b.kl_num_tokens = c.take<index_t>(K);
    return b;
  }
};

/// The logits step's scratch: a KL batch given as logits is forwarded in it.
template <class T>
BatchBuffers carve_step(Carver& c, const StepInputs<T>& in) {
  const bool kl_forward = in.kl.logits.data != nullptr;
  return BatchBuffers::carve(c, in.policy_logits.rows.rows, in.sequences.count,
                             kl_forward ? in.kl.logits.rows.rows : 0,
                             kl_forward ? in.kl.sequences.count : 0);
}

/// Bytes of carve_step()'s layout.
template <class T>
size_t step_workspace_bytes(const StepInputs<T>& in) {
  Carver c(nullptr);
  carve_step(c, in);
  return c.used();
}

/// Checks every host-visible argument of a step (with `grad`: kto_step's) under `fn`.
template <class T>
void validate_step(const StepInputs<T>& in, const Options& o, const LogitsView<T>* grad,
                   const StepOutputs& out, const char* fn) {
  validate_options(o, fn);
  validate_forward_views(in.policy_logits, in.targets, in.sequences, fn, "policy_", false);
  if (grad) kto::detail::validate_gradient(*grad, in.policy_logits, fn);
  validate_device_logp(in.reference_logp, in.sequences.count, fn, "reference_logp");
  kto::detail::require(in.desirable != nullptr, fn, "desirable", "be non-null", "nullptr");
  kto::detail::require(out.metrics != nullptr, fn, "out.metrics", "be non-null", "nullptr");
  validate_statistics(out.token_statistics, o, in.sequences.count, fn, "out.token_statistics");
  if (uses_kl_batch(o)) {
    if (in.kl.logits.data) {
      validate_forward_views(in.kl.logits, in.kl.targets, in.kl.sequences, fn, "kl.", true);
    } else {
      const index_t K = in.kl.policy_logp.size;
      kto::detail::require(K >= 0, fn, "kl.policy_logp.size", "be >= 0", K);
      kto::detail::require(in.kl.policy_logp.data != nullptr || K == 0, fn, "kl.policy_logp",
                           "be non-null (or give kl.logits)", "nullptr");
      kto::detail::require(
          in.kl.num_tokens != nullptr || K == 0 || o.kl_estimator != KlEstimator::nonempty_mean, fn,
          "kl.num_tokens", "be non-null for the nonempty_mean estimator", "nullptr");
    }
    validate_device_logp(in.kl.reference_logp, kl_count(in), fn, "kl.reference_logp");
  }
}

/// The forward of a step into `out` (arrays it leaves null: the workspace's),
/// after the checks; with `grad`, the backward too.
template <class T>
Status run_step(void* workspace, size_t& workspace_bytes, const StepInputs<T>& in, const Options& o,
                const StepOutputs& out, cudaStream_t stream, const KlAllReduce& all_reduce,
                const LogitsView<T>* grad, const char* fn) {
  Status status;
  if (!workspace_ready(workspace, workspace_bytes, step_workspace_bytes(in), status, fn))
    return status;
  Carver c(workspace);
  const BatchBuffers b = carve_step(c, in);
  float* row_lse = out.row_lse ? out.row_lse : b.row_lse;
  float* logp = out.logp ? out.logp : b.logp;
  index_t* num_tokens = out.num_tokens ? out.num_tokens : b.num_tokens;
  ExampleOutputs ex{out.examples.ratio ? out.examples.ratio : b.ratio,
                    out.examples.reward ? out.examples.reward : b.reward,
                    out.examples.loss ? out.examples.loss : b.loss,
                    out.examples.grad_logp ? out.examples.grad_logp : b.grad_logp};

  const RowExtras extras = row_extras(o, b.row_entropy, b.row_mean_logit, out.token_statistics);
  reset_errors(b.errors, stream);
  launch_forward(in.policy_logits, in.targets, in.sequences, o.ignore_index, row_lse, b.token_logp,
                 logp, num_tokens, o.average_logprob, extras, b.errors, 0u, stream);

  cudaMemsetAsync(b.partial, 0, sizeof(KlPartial), stream);
  const index_t K = kl_count(in);
  if (uses_kl_batch(o) && K > 0) {
    const float* kl_logp = in.kl.policy_logp.data;
    const index_t* kl_tokens = in.kl.num_tokens;
    if (in.kl.logits.data) {
      launch_forward(in.kl.logits, in.kl.targets, in.kl.sequences, o.ignore_index, b.kl_row_lse,
                     b.kl_token_logp, b.kl_logp, b.kl_num_tokens, o.average_logprob,
                     extras.without_statistics(), b.errors, device::kKlBatchTag, stream);
      kl_logp = b.kl_logp;
      kl_tokens = b.kl_num_tokens;
    }
    device::KlParams kp{kl_logp, in.kl.reference_logp.data, kl_tokens, K, o.kl_estimator, b.partial,
                        b.errors};
    device::kl_partial_kernel<<<1, device::kFinishThreads, 0, stream>>>(kp);
  }
  status = last_launch(fn);
  if (!status) return status;
  if (all_reduce) {
    device::PreCollectiveParams pc{in.reference_logp.data, in.desirable, in.sequences.count,
                                   b.partial, b.errors};
    device::note_failures_kernel<<<1, device::kFinishThreads, 0, stream>>>(pc);
    status = all_reduce(b.partial, stream);
    if (!status) return status;
  }
  device::FinishParams fp{b.partial,
                          logp,
                          in.reference_logp.data,
                          in.desirable,
                          in.sequences.count,
                          o,
                          ex.ratio,
                          ex.reward,
                          ex.loss,
                          ex.grad_logp,
                          out.metrics,
                          b.errors};
  device::finish_kernel<<<1, device::kFinishThreads, 0, stream>>>(fp);
  if (grad)
    return run_backward(BackwardArguments<T>{in.policy_logits, in.targets, in.sequences, row_lse,
                                             ex.grad_logp, num_tokens, o, *grad},
                        stream, fn);
  return last_launch(fn);
}

}  // namespace detail

/// Checks every host-visible argument of kto_step(); launches nothing.
template <class T>
Status can_implement(const StepInputs<T>& in, const Options& o, const LogitsView<T>& grad,
                     const StepOutputs& out) {
  detail::check_logit_type<T>();
  try {
    detail::validate_step(in, o, &grad, out, "kto::cuda::kto_step");
  } catch (const kto::Error& e) {
    return Status::from(e);
  }
  return Status::success();
}

/// Workspace of step_forward() and kto_step() (the same layout).
template <class T>
size_t kto_step_workspace_bytes(const StepInputs<T>& in) {
  return detail::step_workspace_bytes(in);
}

/// Forward half of a step, the twin of kto::cpu::step_forward: loss, metrics
/// and per-example outputs into `out`, plus the residuals step_backward()
/// reads (out.row_lse, out.num_tokens, out.examples.grad_logp: required).
/// With `all_reduce`, the KL partial is summed across ranks before the finish.
template <class T>
Status step_forward(void* workspace, size_t& workspace_bytes, const StepInputs<T>& in,
                    const Options& o, const StepOutputs& out, cudaStream_t stream,
                    const KlAllReduce& all_reduce = {}) {
  detail::check_logit_type<T>();
  const char* fn = "kto::cuda::step_forward";
  try {
    detail::validate_step<T>(in, o, nullptr, out, fn);
    kto::detail::require(out.row_lse != nullptr || in.policy_logits.rows.rows == 0, fn,
                         "out.row_lse", "be non-null (the backward's residual)", "nullptr");
    kto::detail::require(out.num_tokens != nullptr, fn, "out.num_tokens",
                         "be non-null (the backward's residual)", "nullptr");
    kto::detail::require(out.examples.grad_logp != nullptr, fn, "out.examples.grad_logp",
                         "be non-null (the backward's residual)", "nullptr");
  } catch (const kto::Error& e) {
    return Status::from(e);
  }
  return detail::run_step<T>(workspace, workspace_bytes, in, o, out, stream, all_reduce, nullptr,
                             fn);
}

/// Backward half, the twin of kto::cpu::step_backward: ∂L/∂logits into `grad`
/// (which may alias the logits exactly) from step_forward()'s residuals.
/// `cotangent` (a device scalar, or null for 1) scales the loss; it is read on the
/// device and not checked (a NaN/inf cotangent gives NaN/inf gradients).
template <class T>
Status step_backward(const StepInputs<T>& in, const StepOutputs& forward, const Options& o,
                     const LogitsView<T>& grad, cudaStream_t stream,
                     const float* cotangent = nullptr) {
  detail::check_logit_type<T>();
  const char* fn = "kto::cuda::step_backward";
  const BackwardArguments<T> args{
      in.policy_logits,   in.targets, in.sequences, forward.row_lse, forward.examples.grad_logp,
      forward.num_tokens, o,          grad,         cotangent};
  detail::BackwardNames names;
  names.views_prefix = "policy_";
  names.row_lse = "forward.row_lse";
  names.grad_logp = "forward.examples.grad_logp";
  names.num_tokens = "forward.num_tokens";
  names.allow_empty = false;
  const Status status = detail::checked(args, fn, names);
  if (!status) return status;
  return detail::run_backward(args, stream, fn);
}

/// The whole step for one process: step_forward, then step_backward into `grad`.
template <class T>
Status kto_step(void* workspace, size_t& workspace_bytes, const StepInputs<T>& in, const Options& o,
                const LogitsView<T>& grad, const StepOutputs& out, cudaStream_t stream,
                const KlAllReduce& all_reduce = {}) {
  Status status = can_implement(in, o, grad, out);
  if (!status) return status;
  return detail::run_step<T>(workspace, workspace_bytes, in, o, out, stream, all_reduce, &grad,
                             "kto::cuda::kto_step");
}

}  // namespace cuda
}  // namespace kto
