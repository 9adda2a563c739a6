// cuda/phases.hpp — the four phases of a step, each in CUTLASS's shape.
//
//   phase              arguments                    what it does
//   sequence_logprobs  SequenceLogprobsArguments<T> per-row lse and ℓ_r, per-sequence logp
//                                                   (the policy's, the reference's, a KL
//                                                   batch's forward)
//   kl_partial         KlPartialArguments           (S, C) of the KL batch → the caller
//                                                   all-reduces it
//   finish             FinishArguments              z0, ρ, loss, g_s, TRL's metrics
//   backward           BackwardArguments<T>         dlogits = g_s c_r (onehot − e^(z − lse))
//
// For each: can_implement(args) checks every host-visible argument and launches
// nothing; workspace_bytes(args) is the scratch it needs; run(workspace, bytes,
// args, stream) checks, then launches (backward needs no workspace: run(args,
// stream)). The positional functions (sequence_logprobs(...), ...) build the
// arguments and call run. Conventions are step.hpp's: device pointers, no
// allocation, no synchronisation, graph-capturable; device-side errors are read
// back with read_status().
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include <kto/device/backward_kernel.cuh>
#include <kto/device/device_errors.cuh>
#include <kto/device/finish_kernels.cuh>
#include <kto/device/forward_kernels.cuh>

#include "../layout.hpp"
#include "../metrics.hpp"
#include "../model_logp.hpp"
#include "../options.hpp"
#include "../reference_point.hpp"
#include "../validate.hpp"
#include "dispatch.hpp"
#include "status.hpp"
#include "workspace.hpp"

namespace kto {
namespace cuda {

/// Per-sequence sums of the scored tokens' entropy and mean logit
/// (token_statistics.hpp), device arrays of one double per sequence: the twin
/// of kto::SequenceTokenStatistics. Required with Options::token_statistics.
struct SequenceTokenStatistics {
  double* entropy_sum = nullptr;
  double* mean_logit_sum = nullptr;
};

namespace detail {

/// A device array of `count` log-probs: its size matches, its pointer is set (when count > 0).
template <class Logp>
void validate_device_logp(const Logp& logp, index_t count, const char* fn,
                          const std::string& name) {
  kto::detail::require(logp.size == count, fn, name + ".size",
                       "equal the number of examples (" + std::to_string(count) + ")", logp.size);
  kto::detail::require(logp.data != nullptr || count == 0, fn, name, "be non-null", "nullptr");
}

/// With options.token_statistics, both per-sequence arrays (when there are sequences).
inline void validate_statistics(const SequenceTokenStatistics& statistics, const Options& o,
                                index_t count, const char* fn, const std::string& name) {
  if (!o.token_statistics || count == 0) return;
  kto::detail::require(statistics.entropy_sum != nullptr, fn, name + ".entropy_sum",
                       "be non-null with options.token_statistics", "nullptr");
  kto::detail::require(statistics.mean_logit_sum != nullptr, fn, name + ".mean_logit_sum",
                       "be non-null with options.token_statistics", "nullptr");
}

template <class T>
void validate_forward_views(const LogitsView<const T>& logits, const TargetsView& targets,
                            const SequencesView& seqs, const char* fn, const std::string& prefix,
                            bool allow_empty) {
  kto::detail::validate_logits(logits, fn, prefix + "logits");
  kto::detail::require(logits.rows.rows < (index_t{1} << 31), fn, prefix + "logits.rows",
                       "be < 2^31 (one CUDA block or warp per row)", logits.rows.rows);
  kto::detail::validate_targets(targets, logits.rows.rows, fn, prefix + "targets");
  kto::detail::require(seqs.count >= (allow_empty ? 0 : 1), fn, prefix + "sequences.count",
                       allow_empty ? "be >= 0" : "be >= 1 (an empty batch has no loss)",
                       seqs.count);
  kto::detail::require(seqs.offsets != nullptr, fn, prefix + "sequences.offsets",
                       "be non-null (count + 1 entries, device memory)", "nullptr");
}

/// Offsets non-decreasing and inside [0, rows]; a bad entry is recorded.
inline void launch_validate_offsets(const SequencesView& seqs, index_t rows,
                                    device::DeviceErrors* errors, unsigned tag,
                                    cudaStream_t stream) {
  const index_t entries = seqs.count + 1;
  const auto blocks = static_cast<unsigned>(std::min<index_t>((entries + 255) / 256, 1024));
  device::validate_offsets_kernel<<<blocks, 256, 0, stream>>>(seqs, rows, errors, tag);
}

/// What a row pass computes beyond lse and ℓ: the logit transform (every batch),
/// and on request the target batch's token statistics (per row, then per sequence).
struct RowExtras {
  device::RowTransform transform;
  bool transformed = false;
  float* row_entropy = nullptr;  ///< null: no statistics
  float* row_mean_logit = nullptr;
  SequenceTokenStatistics statistics;

  bool extended() const { return transformed || row_entropy != nullptr; }
  /// The KL batch's: the transform only.
  RowExtras without_statistics() const {
    RowExtras e;
    e.transform = transform;
    e.transformed = transformed;
    return e;
  }
};

/// The extras of options `o`; with o.token_statistics, the statistics go to the
/// row buffers, then to `statistics` per sequence.
inline RowExtras row_extras(const Options& o, float* row_entropy, float* row_mean_logit,
                            const SequenceTokenStatistics& statistics) {
  RowExtras e;
  const LogitTransform t = logit_transform(o);
  e.transform = device::RowTransform::of(t);
  e.transformed = !t.identity();
  if (o.token_statistics) {
    e.row_entropy = row_entropy;
    e.row_mean_logit = row_mean_logit;
    e.statistics = statistics;
  }
  return e;
}

template <class T>
void launch_forward(const LogitsView<const T>& logits, const TargetsView& targets,
                    const SequencesView& seqs, index_t ignore_index, float* row_lse,
                    float* token_logp, float* logp, index_t* num_tokens, bool average,
                    const RowExtras& extras, device::DeviceErrors* errors, unsigned tag,
                    cudaStream_t stream) {
  const index_t rows = logits.rows.rows;
  launch_validate_offsets(seqs, rows, errors, tag, stream);
  if (rows > 0) {
    device::ForwardParams<T> p{logits,
                               targets,
                               seqs,
                               ignore_index,
                               row_lse,
                               token_logp,
                               errors,
                               tag,
                               extras.transform,
                               extras.row_entropy,
                               extras.row_mean_logit};
    launch_rows(logits.vocab, rows, extras.extended(),
                [&](auto threads, auto per_block, auto ext, dim3 grid, dim3 block) {
                  device::row_forward_kernel<T, decltype(threads)::value,
                                             decltype(per_block)::value, decltype(ext)::value>
                      <<<grid, block, 0, stream>>>(p);
                });
  }
  if (seqs.count > 0) {
    device::SequenceParams sp{targets,
                              seqs,
                              rows,
                              ignore_index,
                              average,
                              token_logp,
                              logp,
                              num_tokens,
                              extras.row_entropy,
                              extras.row_mean_logit,
                              extras.statistics.entropy_sum,
                              extras.statistics.mean_logit_sum};
    const auto blocks = static_cast<unsigned>((seqs.count + 7) / 8);
    device::sequence_logp_kernel<<<blocks, 256, 0, stream>>>(sp);
  }
}

template <class T>
constexpr void check_logit_type() {
  static_assert(device::is_logit_type<T>::value,
                "kto::cuda: logits must be float, __half or __nv_bfloat16");
}

}  // namespace detail

// ---------------------------------------------------------------- forward --

/// Bytes of workspace sequence_logprobs() needs for `rows` rows.
inline size_t sequence_logprobs_workspace_bytes(index_t rows) {
  detail::Carver c(nullptr);
  c.take<device::DeviceErrors>(1);
  c.take<float>(rows);  // row_lse, first: workspace_row_lse() finds it there
  c.take<float>(rows);  // token_logp
  c.take<float>(rows);  // entropy, with options.token_statistics
  c.take<float>(rows);  // mean logit
  return c.used();
}

/// Per-row lse that sequence_logprobs() left in its workspace (for backward()).
inline const float* workspace_row_lse(const void* workspace) {
  return reinterpret_cast<const float*>(static_cast<const char*>(workspace) + detail::kAlignment);
}

/// logp[s] and num_tokens[s] for every sequence (device arrays of sequences.count
/// entries), of the logits after the options' transform; with options.token_statistics,
/// `statistics` too (both arrays required).
template <class T>
struct SequenceLogprobsArguments {
  LogitsView<const T> logits{};
  TargetsView targets{};
  SequencesView sequences{};
  Options options{};
  float* logp = nullptr;
  index_t* num_tokens = nullptr;
  SequenceTokenStatistics statistics{};
};

/// (S, C) of the KL batch into `partial` (device), over policy_logp.size examples.
/// num_tokens may be null unless options.kl_estimator is nonempty_mean.
struct KlPartialArguments {
  PolicyLogp<float> policy_logp{};
  ReferenceLogp<float> reference_logp{};
  const index_t* num_tokens = nullptr;
  Options options{};
  KlPartial* partial = nullptr;
};

/// Per-example outputs of finish(), device arrays of `count` entries.
struct ExampleOutputs {
  float* ratio = nullptr;
  float* reward = nullptr;
  float* loss = nullptr;
  float* grad_logp = nullptr;
};

/// Loss, metrics and g_s over policy_logp.size examples, given the all-reduced partial.
struct FinishArguments {
  const KlPartial* partial = nullptr;
  PolicyLogp<float> policy_logp{};
  ReferenceLogp<float> reference_logp{};
  const std::uint8_t* desirable = nullptr;
  Options options{};
  ExampleOutputs out{};
  Metrics* metrics = nullptr;
};

/// grad = ∂L/∂logits from the forward's row_lse and the finish's g_s; `grad` may
/// alias `logits` exactly (in place). `cotangent`: a device scalar scaling the
/// loss (null: 1), read on the device and not checked.
template <class T>
struct BackwardArguments {
  LogitsView<const T> logits{};
  TargetsView targets{};
  SequencesView sequences{};
  const float* row_lse = nullptr;
  const float* grad_logp = nullptr;
  const index_t* num_tokens = nullptr;
  Options options{};
  LogitsView<T> grad{};
  const float* cotangent = nullptr;
};

namespace detail {

template <class T>
void validate(const SequenceLogprobsArguments<T>& a, const char* fn) {
  validate_options(a.options, fn);
  validate_forward_views(a.logits, a.targets, a.sequences, fn, "", true);
  const index_t B = a.sequences.count;
  kto::detail::require(a.logp != nullptr || B == 0, fn, "logp", "be non-null", "nullptr");
  kto::detail::require(a.num_tokens != nullptr || B == 0, fn, "num_tokens", "be non-null",
                       "nullptr");
  validate_statistics(a.statistics, a.options, B, fn, "statistics");
}

inline void validate(const KlPartialArguments& a, const char* fn) {
  validate_options(a.options, fn);
  const index_t count = a.policy_logp.size;
  kto::detail::require(count >= 0, fn, "kl.policy_logp.size", "be >= 0", count);
  kto::detail::require(a.policy_logp.data != nullptr || count == 0, fn, "kl.policy_logp",
                       "be non-null", "nullptr");
  kto::detail::require(a.reference_logp.size == count, fn, "kl.reference_logp.size",
                       "equal kl.policy_logp.size (" + std::to_string(count) + ")",
                       a.reference_logp.size);
  kto::detail::require(a.reference_logp.data != nullptr || count == 0, fn, "kl.reference_logp",
                       "be non-null", "nullptr");
  kto::detail::require(
      a.num_tokens != nullptr || count == 0 || a.options.kl_estimator != KlEstimator::nonempty_mean,
      fn, "kl.num_tokens", "be non-null for the nonempty_mean estimator", "nullptr");
  kto::detail::require(a.partial != nullptr, fn, "partial", "be non-null", "nullptr");
}

inline void validate(const FinishArguments& a, const char* fn) {
  validate_options(a.options, fn);
  const index_t count = a.policy_logp.size;
  kto::detail::require(count >= 1, fn, "policy_logp.size", "be >= 1 (an empty batch has no loss)",
                       count);
  kto::detail::require(a.partial != nullptr, fn, "partial", "be non-null", "nullptr");
  kto::detail::require(a.policy_logp.data != nullptr, fn, "policy_logp", "be non-null", "nullptr");
  kto::detail::require(a.reference_logp.size == count, fn, "reference_logp.size",
                       "equal policy_logp.size (" + std::to_string(count) + ")",
                       a.reference_logp.size);
  kto::detail::require(a.reference_logp.data != nullptr, fn, "reference_logp", "be non-null",
                       "nullptr");
  kto::detail::require(a.desirable != nullptr, fn, "desirable", "be non-null", "nullptr");
  const ExampleOutputs& o = a.out;
  kto::detail::require(o.ratio && o.reward && o.loss && o.grad_logp, fn, "out",
                       "have four non-null arrays", "a null array");
  kto::detail::require(a.metrics != nullptr, fn, "metrics", "be non-null", "nullptr");
}

/// How the public entry point that runs a backward names its arguments: backward()
/// takes them directly, step_backward() from the step's inputs and the forward's outputs.
struct BackwardNames {
  const char* views_prefix = "";
  const char* row_lse = "row_lse";
  const char* grad_logp = "grad_logp";
  const char* num_tokens = "num_tokens";
  bool allow_empty = true;  ///< zero sequences allowed
};

template <class T>
void validate(const BackwardArguments<T>& a, const char* fn, const BackwardNames& names = {}) {
  validate_options(a.options, fn);
  validate_forward_views(a.logits, a.targets, a.sequences, fn, names.views_prefix,
                         names.allow_empty);
  kto::detail::validate_gradient(a.grad, a.logits, fn);
  kto::detail::require(a.row_lse != nullptr || a.logits.rows.rows == 0, fn, names.row_lse,
                       "be non-null", "nullptr");
  const bool none = a.sequences.count == 0;
  kto::detail::require(a.grad_logp != nullptr || none, fn, names.grad_logp, "be non-null",
                       "nullptr");
  kto::detail::require(a.num_tokens != nullptr || none, fn, names.num_tokens, "be non-null",
                       "nullptr");
}

/// validate(args, fn, extra...) as a Status.
template <class Args, class... Extra>
Status checked(const Args& a, const char* fn, const Extra&... extra) {
  try {
    validate(a, fn, extra...);
  } catch (const kto::Error& e) {
    return Status::from(e);
  }
  return Status::success();
}

/// The backward row kernel over checked arguments, with the options' logit transform
/// (the extended kernel only for a transform: statistics are forward-only).
template <class T>
Status run_backward(const BackwardArguments<T>& a, cudaStream_t stream, const char* fn) {
  const LogitTransform t = logit_transform(a.options);
  const device::BackwardParams<T> p{a.logits,
                                    a.targets,
                                    a.sequences,
                                    a.options.ignore_index,
                                    a.options.average_logprob,
                                    a.row_lse,
                                    a.grad_logp,
                                    a.num_tokens,
                                    a.grad,
                                    a.cotangent,
                                    device::RowTransform::of(t)};
  launch_rows(p.logits.vocab, p.logits.rows.rows, !t.identity(),
              [&](auto threads, auto per_block, auto ext, dim3 grid, dim3 block) {
                device::row_backward_kernel<T, decltype(threads)::value, decltype(per_block)::value,
                                            decltype(ext)::value><<<grid, block, 0, stream>>>(p);
              });
  return last_launch(fn);
}

}  // namespace detail

// ---------------------------------------------------------------- forward --

template <class T>
Status can_implement(const SequenceLogprobsArguments<T>& a) {
  detail::check_logit_type<T>();
  return detail::checked(a, "kto::cuda::sequence_logprobs");
}

template <class T>
size_t workspace_bytes(const SequenceLogprobsArguments<T>& a) {
  return sequence_logprobs_workspace_bytes(a.logits.rows.rows);
}

template <class T>
Status run(void* workspace, size_t& bytes, const SequenceLogprobsArguments<T>& a,
           cudaStream_t stream) {
  const char* fn = "kto::cuda::sequence_logprobs";
  Status status = can_implement(a);
  if (!status) return status;
  if (!detail::workspace_ready(workspace, bytes, workspace_bytes(a), status, fn)) return status;
  const index_t rows = a.logits.rows.rows;
  detail::Carver c(workspace);
  auto* errors = c.take<device::DeviceErrors>(1);
  float* row_lse = c.take<float>(rows);
  float* token_logp = c.take<float>(rows);
  float* row_entropy = c.take<float>(rows);
  float* row_mean_logit = c.take<float>(rows);
  detail::reset_errors(errors, stream);
  detail::launch_forward(a.logits, a.targets, a.sequences, a.options.ignore_index, row_lse,
                         token_logp, a.logp, a.num_tokens, a.options.average_logprob,
                         detail::row_extras(a.options, row_entropy, row_mean_logit, a.statistics),
                         errors, 0u, stream);
  return detail::last_launch(fn);
}

/// run() of SequenceLogprobsArguments{logits, targets, sequences, o, logp, num_tokens,
/// statistics}.
template <class T>
Status sequence_logprobs(void* workspace, size_t& workspace_bytes,
                         const LogitsView<const T>& logits, const TargetsView& targets,
                         const SequencesView& sequences, const Options& o, float* logp,
                         index_t* num_tokens, cudaStream_t stream,
                         const SequenceTokenStatistics& statistics = {}) {
  return run(
      workspace, workspace_bytes,
      SequenceLogprobsArguments<T>{logits, targets, sequences, o, logp, num_tokens, statistics},
      stream);
}

// ------------------------------------------------------- KL partial, finish --

inline Status can_implement(const KlPartialArguments& a) {
  return detail::checked(a, "kto::cuda::kl_partial");
}

inline size_t workspace_bytes(const KlPartialArguments&) {
  return errors_workspace_bytes();
}

inline Status run(void* workspace, size_t& bytes, const KlPartialArguments& a,
                  cudaStream_t stream) {
  const char* fn = "kto::cuda::kl_partial";
  Status status = can_implement(a);
  if (!status) return status;
  device::DeviceErrors* errors = detail::error_word(workspace, bytes, status, fn, stream);
  if (errors == nullptr) return status;
  device::KlParams p{a.policy_logp.data,
                     a.reference_logp.data,
                     a.num_tokens,
                     a.policy_logp.size,
                     a.options.kl_estimator,
                     a.partial,
                     errors};
  device::kl_partial_kernel<<<1, device::kFinishThreads, 0, stream>>>(p);
  return detail::last_launch(fn);
}

/// run() of KlPartialArguments{policy_logp, reference_logp, num_tokens, o, partial}.
inline Status kl_partial(void* workspace, size_t& workspace_bytes, PolicyLogp<float> policy_logp,
                         ReferenceLogp<float> reference_logp, const index_t* num_tokens,
                         const Options& o, KlPartial* partial, cudaStream_t stream) {
  return run(workspace, workspace_bytes,
             KlPartialArguments{policy_logp, reference_logp, num_tokens, o, partial}, stream);
}

inline Status can_implement(const FinishArguments& a) {
  return detail::checked(a, "kto::cuda::finish");
}

inline size_t workspace_bytes(const FinishArguments&) {
  return errors_workspace_bytes();
}

inline Status run(void* workspace, size_t& bytes, const FinishArguments& a, cudaStream_t stream) {
  const char* fn = "kto::cuda::finish";
  Status status = can_implement(a);
  if (!status) return status;
  device::DeviceErrors* errors = detail::error_word(workspace, bytes, status, fn, stream);
  if (errors == nullptr) return status;
  device::FinishParams p{a.partial,       a.policy_logp.data, a.reference_logp.data,
                         a.desirable,     a.policy_logp.size, a.options,
                         a.out.ratio,     a.out.reward,       a.out.loss,
                         a.out.grad_logp, a.metrics,          errors};
  device::finish_kernel<<<1, device::kFinishThreads, 0, stream>>>(p);
  return detail::last_launch(fn);
}

/// run() of FinishArguments{partial, policy_logp, reference_logp, desirable, o, out, metrics}.
inline Status finish(void* workspace, size_t& workspace_bytes, const KlPartial* partial,
                     PolicyLogp<float> policy_logp, ReferenceLogp<float> reference_logp,
                     const std::uint8_t* desirable, const Options& o, const ExampleOutputs& out,
                     Metrics* metrics, cudaStream_t stream) {
  return run(workspace, workspace_bytes,
             FinishArguments{partial, policy_logp, reference_logp, desirable, o, out, metrics},
             stream);
}

// --------------------------------------------------------------- backward --

template <class T>
Status can_implement(const BackwardArguments<T>& a) {
  detail::check_logit_type<T>();
  return detail::checked(a, "kto::cuda::backward");
}

/// The backward needs no workspace.
template <class T>
Status run(const BackwardArguments<T>& a, cudaStream_t stream) {
  Status status = can_implement(a);
  if (!status) return status;
  return detail::run_backward(a, stream, "kto::cuda::backward");
}

/// run() of BackwardArguments{logits, targets, sequences, row_lse, grad_logp, num_tokens, o,
/// grad}.
template <class T>
Status backward(const LogitsView<const T>& logits, const TargetsView& targets,
                const SequencesView& sequences, const float* row_lse, const float* grad_logp,
                const index_t* num_tokens, const Options& o, const LogitsView<T>& grad,
                cudaStream_t stream) {
  return run(
      BackwardArguments<T>{logits, targets, sequences, row_lse, grad_logp, num_tokens, o, grad},
      stream);
}

}  // namespace cuda
}  // namespace kto
