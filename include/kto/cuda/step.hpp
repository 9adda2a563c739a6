// cuda/step.hpp — the KTO step on a CUDA stream, CUB style.
//
//   sequence_logprobs  forward: per-row lse and ℓ_r, per-sequence logp (also
//                      the reference model's and the KL batch's forward)
//   kl_partial         (S, C) of the KL batch → the caller all-reduces it
//   finish             z0, ρ, loss, g_s, TRL's metrics (one small block)
//   backward           dlogits = g_s c_r (onehot − e^(z − lse)), in place or not
//   kto_step           all of the above for one process (with an optional
//                      all-reduce hook between the partial and the finish)
//
// Conventions: every pointer is a device pointer; nothing allocates or
// synchronises; every call is stream-ordered and safe under CUDA graph
// capture. Calls that need scratch take (workspace, workspace_bytes): pass a
// null workspace to learn the size, then call again with at least that many
// bytes (256-byte aligned, as cudaMalloc returns). Errors that only the device
// can see are recorded in the workspace; read_status() reports them.
// Requires nvcc: include this header from .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <vector>

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

/// The backward row kernel over p's rows, with options `o`'s logit transform
/// (the extended kernel only for a transform: statistics are forward-only).
template <class T>
void launch_backward(device::BackwardParams<T> p, const Options& o, cudaStream_t stream) {
  const LogitTransform t = logit_transform(o);
  p.transform = device::RowTransform::of(t);
  launch_rows(p.logits.vocab, p.logits.rows.rows, !t.identity(),
              [&](auto threads, auto per_block, auto ext, dim3 grid, dim3 block) {
                device::row_backward_kernel<T, decltype(threads)::value, decltype(per_block)::value,
                                            decltype(ext)::value><<<grid, block, 0, stream>>>(p);
              });
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

/// logp[s] and num_tokens[s] for every sequence (device arrays of count entries),
/// of the transformed logits (options' logit transform); with
/// options.token_statistics, `statistics` too (both arrays required).
template <class T>
Status sequence_logprobs(void* workspace, size_t& workspace_bytes,
                         const LogitsView<const T>& logits, const TargetsView& targets,
                         const SequencesView& sequences, const Options& o, float* logp,
                         index_t* num_tokens, cudaStream_t stream,
                         const SequenceTokenStatistics& statistics = {}) {
  detail::check_logit_type<T>();
  const char* fn = "kto::cuda::sequence_logprobs";
  try {
    validate_options(o, fn);
    detail::validate_forward_views(logits, targets, sequences, fn, "", true);
    kto::detail::require(logp != nullptr || sequences.count == 0, fn, "logp", "be non-null",
                         "nullptr");
    kto::detail::require(num_tokens != nullptr || sequences.count == 0, fn, "num_tokens",
                         "be non-null", "nullptr");
    detail::validate_statistics(statistics, o, sequences.count, fn, "statistics");
  } catch (const kto::Error& e) {
    return Status::from(e);
  }
  Status status;
  const size_t needed = sequence_logprobs_workspace_bytes(logits.rows.rows);
  if (!detail::workspace_ready(workspace, workspace_bytes, needed, status, fn)) return status;
  detail::Carver c(workspace);
  auto* errors = c.take<device::DeviceErrors>(1);
  float* row_lse = c.take<float>(logits.rows.rows);
  float* token_logp = c.take<float>(logits.rows.rows);
  float* row_entropy = c.take<float>(logits.rows.rows);
  float* row_mean_logit = c.take<float>(logits.rows.rows);
  detail::reset_errors(errors, stream);
  detail::launch_forward(logits, targets, sequences, o.ignore_index, row_lse, token_logp, logp,
                         num_tokens, o.average_logprob,
                         detail::row_extras(o, row_entropy, row_mean_logit, statistics), errors, 0u,
                         stream);
  return detail::last_launch(fn);
}

// ------------------------------------------------------- KL partial, finish --

/// (S, C) of the KL batch into `partial` (device), over policy_logp.size
/// examples. num_tokens may be null unless options.kl_estimator is nonempty_mean.
inline Status kl_partial(void* workspace, size_t& workspace_bytes, PolicyLogp<float> policy_logp,
                         ReferenceLogp<float> reference_logp, const index_t* num_tokens,
                         const Options& o, KlPartial* partial, cudaStream_t stream) {
  const char* fn = "kto::cuda::kl_partial";
  const index_t count = policy_logp.size;
  try {
    validate_options(o, fn);
    kto::detail::require(count >= 0, fn, "kl_policy_logp.size", "be >= 0", count);
    kto::detail::require(policy_logp.data != nullptr || count == 0, fn, "kl_policy_logp",
                         "be non-null", "nullptr");
    kto::detail::require(reference_logp.size == count, fn, "kl_reference_logp.size",
                         "equal kl_policy_logp.size (" + std::to_string(count) + ")",
                         reference_logp.size);
    kto::detail::require(reference_logp.data != nullptr || count == 0, fn, "kl_reference_logp",
                         "be non-null", "nullptr");
    kto::detail::require(
        num_tokens != nullptr || count == 0 || o.kl_estimator != KlEstimator::nonempty_mean, fn,
        "kl_num_tokens", "be non-null for the nonempty_mean estimator", "nullptr");
    kto::detail::require(partial != nullptr, fn, "partial", "be non-null", "nullptr");
  } catch (const kto::Error& e) {
    return Status::from(e);
  }
  Status status;
  device::DeviceErrors* errors = detail::error_word(workspace, workspace_bytes, status, fn, stream);
  if (errors == nullptr) return status;
  device::KlParams p{
      policy_logp.data, reference_logp.data, num_tokens, count, o.kl_estimator, partial, errors};
  device::kl_partial_kernel<<<1, device::kFinishThreads, 0, stream>>>(p);
  return detail::last_launch(fn);
}

/// Per-example outputs of finish(), device arrays of `count` entries.
struct ExampleOutputs {
  float* ratio = nullptr;
  float* reward = nullptr;
  float* loss = nullptr;
  float* grad_logp = nullptr;
};

/// Loss, metrics and g_s over policy_logp.size examples, given the all-reduced partial.
inline Status finish(void* workspace, size_t& workspace_bytes, const KlPartial* partial,
                     PolicyLogp<float> policy_logp, ReferenceLogp<float> reference_logp,
                     const std::uint8_t* desirable, const Options& o, const ExampleOutputs& out,
                     Metrics* metrics, cudaStream_t stream) {
  const char* fn = "kto::cuda::finish";
  const index_t count = policy_logp.size;
  try {
    validate_options(o, fn);
    kto::detail::require(count >= 1, fn, "policy_logp.size", "be >= 1 (an empty batch has no loss)",
                         count);
    kto::detail::require(partial != nullptr, fn, "partial", "be non-null", "nullptr");
    kto::detail::require(policy_logp.data != nullptr, fn, "policy_logp", "be non-null", "nullptr");
    kto::detail::require(reference_logp.size == count, fn, "reference_logp.size",
                         "equal policy_logp.size (" + std::to_string(count) + ")",
                         reference_logp.size);
    kto::detail::require(reference_logp.data != nullptr, fn, "reference_logp", "be non-null",
                         "nullptr");
    kto::detail::require(desirable != nullptr, fn, "desirable", "be non-null", "nullptr");
    kto::detail::require(out.ratio && out.reward && out.loss && out.grad_logp, fn, "out",
                         "have four non-null arrays", "a null array");
    kto::detail::require(metrics != nullptr, fn, "metrics", "be non-null", "nullptr");
  } catch (const kto::Error& e) {
    return Status::from(e);
  }
  Status status;
  device::DeviceErrors* errors = detail::error_word(workspace, workspace_bytes, status, fn, stream);
  if (errors == nullptr) return status;
  device::FinishParams p{
      partial,    policy_logp.data, reference_logp.data, desirable, count, o, out.ratio,
      out.reward, out.loss,         out.grad_logp,       metrics,   errors};
  device::finish_kernel<<<1, device::kFinishThreads, 0, stream>>>(p);
  return detail::last_launch(fn);
}

// --------------------------------------------------------------- backward --

/// grad = ∂L/∂logits; `grad` may alias `logits` exactly (in place).
template <class T>
Status backward(const LogitsView<const T>& logits, const TargetsView& targets,
                const SequencesView& sequences, const float* row_lse, const float* grad_logp,
                const index_t* num_tokens, const Options& o, const LogitsView<T>& grad,
                cudaStream_t stream) {
  detail::check_logit_type<T>();
  const char* fn = "kto::cuda::backward";
  try {
    validate_options(o, fn);
    detail::validate_forward_views(logits, targets, sequences, fn, "", true);
    kto::detail::validate_gradient(grad, logits, fn);
    kto::detail::require(row_lse != nullptr || logits.rows.rows == 0, fn, "row_lse", "be non-null",
                         "nullptr");
    kto::detail::require(grad_logp != nullptr || sequences.count == 0, fn, "grad_logp",
                         "be non-null", "nullptr");
    kto::detail::require(num_tokens != nullptr || sequences.count == 0, fn, "num_tokens",
                         "be non-null", "nullptr");
  } catch (const kto::Error& e) {
    return Status::from(e);
  }
  device::BackwardParams<T> p{logits,         targets,           sequences,
                              o.ignore_index, o.average_logprob, row_lse,
                              grad_logp,      num_tokens,        grad};
  detail::launch_backward(p, o, stream);
  return detail::last_launch(fn);
}

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
using KlAllReduce = std::function<Status(KlPartial* device_partial, cudaStream_t stream)>;

namespace detail {

template <class T>
index_t kl_count(const StepInputs<T>& in) {
  return in.kl.logits.data ? in.kl.sequences.count : in.kl.policy_logp.size;
}

struct StepBuffers {
  device::DeviceErrors* errors;
  float *row_lse, *token_logp, *row_entropy, *row_mean_logit, *kl_row_lse, *kl_token_logp;
  KlPartial* partial;
  float* logp;
  index_t* num_tokens;
  float *ratio, *reward, *loss, *grad_logp, *kl_logp;
  index_t* kl_num_tokens;
};

template <class T>
StepBuffers carve_step(Carver& c, const StepInputs<T>& in) {
  const index_t rows = in.policy_logits.rows.rows, B = in.sequences.count;
  const bool kl_forward = in.kl.logits.data != nullptr;
  const index_t kl_rows = kl_forward ? in.kl.logits.rows.rows : 0;
  const index_t K = kl_forward ? in.kl.sequences.count : 0;
  StepBuffers b;
  b.errors = c.take<device::DeviceErrors>(1);
  b.row_lse = c.take<float>(rows);
  b.token_logp = c.take<float>(rows);
  b.row_entropy = c.take<float>(rows);  // options.token_statistics only: 8 bytes a row
  b.row_mean_logit = c.take<float>(rows);
  b.kl_row_lse = c.take<float>(kl_rows);
  b.kl_token_logp = c.take<float>(kl_rows);
  b.partial = c.take<KlPartial>(1);
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
  const StepBuffers b = carve_step(c, in);
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
  if (grad) {
    device::BackwardParams<T> bp{in.policy_logits, in.targets,        in.sequences,
                                 o.ignore_index,   o.average_logprob, row_lse,
                                 ex.grad_logp,     num_tokens,        *grad};
    launch_backward(bp, o, stream);
  }
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
  try {
    validate_options(o, fn);
    detail::validate_forward_views(in.policy_logits, in.targets, in.sequences, fn, "policy_",
                                   false);
    kto::detail::validate_gradient(grad, in.policy_logits, fn);
    kto::detail::require(forward.row_lse != nullptr || in.policy_logits.rows.rows == 0, fn,
                         "forward.row_lse", "be non-null", "nullptr");
    kto::detail::require(forward.num_tokens != nullptr, fn, "forward.num_tokens", "be non-null",
                         "nullptr");
    kto::detail::require(forward.examples.grad_logp != nullptr, fn, "forward.examples.grad_logp",
                         "be non-null", "nullptr");
  } catch (const kto::Error& e) {
    return Status::from(e);
  }
  device::BackwardParams<T> p{in.policy_logits,
                              in.targets,
                              in.sequences,
                              o.ignore_index,
                              o.average_logprob,
                              forward.row_lse,
                              forward.examples.grad_logp,
                              forward.num_tokens,
                              grad,
                              cotangent};
  detail::launch_backward(p, o, stream);
  return detail::last_launch(fn);
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
