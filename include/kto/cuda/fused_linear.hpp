// cuda/fused_linear.hpp — the fused-linear KTO step on a CUDA stream.
//
// cuBLAS GEMMs (bf16/half in, fp32 accumulate and out) around the row kernels
// of fused_linear_kernels.cuh; see ../fused_linear.hpp for the order of work:
//
//   per chunk   H_c                     gather_scored_rows_kernel (ignored rows as zeros)
//               Z_c = H_c Wᵀ            cublasGemmEx, fp32 logits (bias added by the kernels)
//               lse_r, ℓ_r              chunk_forward_kernel
//               logp_s, g_s, c_r g_s    sequence_logp_kernel, sequence_grad_kernel
//               dZ_c                    chunk_backward_kernel, in the input type
//               dH_c = dZ_c W           cublasGemmEx, fp32 out
//               dW += dZ_cᵀ H_c         cublasGemmEx, fp32 accumulate across chunks
//               db += dZ_cᵀ 1           cublasGemmEx (a GEMV against ones)
//
// A frozen head (LoRA: outputs.d_weight and d_weight_in_input_type empty) skips the dW
// GEMM, an empty outputs.d_bias the db GEMV and its ones (fused_linear_types.hpp):
// keep_chunk is then 2 GEMM passes a row, recompute, vocab_blocks and a slice's 3.
//
// In CUTLASS's shape, as phases.hpp: can_implement(args) checks every host-visible
// argument and launches nothing, workspace_bytes(args) is the scratch,
// run(handle, workspace, bytes, args, stream) checks, then launches;
// fused_linear_kto_step(...) is run() with positional arguments. Where the parts live:
//
//   fused_linear_types.hpp     FusedLinearArguments and what it holds
//   detail/fused_validate.hpp  the host checks
//   detail/fused_workspace.hpp the workspace layout (one chunk and O(rows) scalars)
//   detail/chunk_engine.hpp    the GEMMs and row kernels over one chunk
//   detail/fused_step.hpp      the step's phases and one runner per strategy
//
// keep_chunk needs the offsets on the host too (`host_offsets`) to pack whole
// sequences into chunks; without them, or with strategy recompute, the step
// runs forward over every chunk, then recomputes Z_c for the backward.
// Conventions are step.hpp's: device pointers, no allocation, no sync,
// stream-ordered and graph-capturable (the chunk loop is fixed by the host
// offsets and sizes), workspace query then call, device errors via
// read_status(). The cuBLAS handle is set to `stream` and to a slice of the
// workspace. Extra memory: one chunk (config.chunk_bytes), its hidden rows
// (chunk rows × D in the input type) + O(rows) floats. Ignored rows enter the
// GEMMs as zeros, so a NaN there never reaches a gradient.
// Vocab-parallel (head.weight a vocabulary slice, hooks.gather_partials set): as on
// the CPU, each rank's row partials of both batches go out in one all-gather, the
// ranks are merged in rank order (the same lse on every rank), the backward needs
// no more communication; dH is a partial sum for the caller to all-reduce. Or the
// caller gathers them ahead (fused_linear_row_partials below, each slice's, then
// gather_partials.gathered) and the step computes none of its own.
#pragma once

#include <cublas_v2.h>

#include "detail/fused_step.hpp"
#include "detail/fused_validate.hpp"
#include "fused_linear_types.hpp"

namespace kto {
namespace cuda {

// ------------------------------------------------------------ the step --

/// Checks every host-visible argument of the step; launches nothing. Gradients:
/// d_hidden required; d_weight (or d_weight_in_input_type) and d_bias each checked
/// when given, skipped when empty (a frozen head; fused_linear_types.hpp).
template <class T>
Status can_implement(const FusedLinearArguments<T>& a) {
  detail::check_logit_type<T>();
  try {
    detail::validate(a, "kto::cuda::fused_linear_kto_step");
  } catch (const kto::Error& e) {
    return Status::from(e);
  }
  return Status::success();
}

/// Bytes of workspace the step needs (vocab parallel through gather_partials.gather:
/// with its ranks × (KL rows + rows) gathered partials; gathered ahead, none). An empty
/// outputs.d_bias needs round_up(sizeof(T) × ones rows, 256) bytes less (the db GEMV's ones: the
/// chunk's rows; with vocab_blocks max(chunk rows, hidden.rows)); an empty d_weight changes nothing
/// here (dW is written into the caller's array, which a frozen head does not allocate).
template <class T>
size_t workspace_bytes(const FusedLinearArguments<T>& a) {
  return detail::fused_workspace_bytes(detail::FusedLayout::of(a), a.head, a.config);
}

/// The whole step from hidden states: KL forward → hooks.kl_all_reduce (if set) →
/// target chunks (forward, g_s, backward, GEMMs) → finish (loss, metrics).
template <class T>
Status run(cublasHandle_t handle, void* workspace, size_t& bytes, const FusedLinearArguments<T>& a,
           cudaStream_t stream) {
  const char* fn = "kto::cuda::fused_linear_kto_step";
  Status status = can_implement(a);
  if (!status) return status;
  if (handle == nullptr)
    return Status::make(StatusCode::invalid_argument,
                        "%s: argument 'handle' must be a cuBLAS handle; got nullptr", fn);
  if (!detail::workspace_ready(workspace, bytes, workspace_bytes(a), status, fn)) return status;
  detail::Carver c(workspace);
  const detail::FusedBuffers b =
      detail::carve_fused(c, detail::FusedLayout::of(a), a.head, a.config);
  status = detail::bind_cublas(handle, stream, b.cublas, a.config.cublas_workspace_bytes, fn);
  if (!status) return status;
  return detail::run_fused_step(handle, a, b, stream, fn);
}

/// can_implement() of FusedLinearArguments{in, head, o, out, cfg, {{}, gather_partials}}.
template <class T>
Status can_implement(const FusedLinearInputs<T>& in, const LinearHead<T>& head, const Options& o,
                     const FusedLinearOutputs& out, const FusedLinearConfig& cfg = {},
                     const RowPartialsAllGather& gather_partials = {}) {
  return can_implement(FusedLinearArguments<T>{in, head, o, out, cfg, {{}, gather_partials}});
}

/// workspace_bytes() of the step's arguments for any outputs: the most it needs (dW and
/// db asked for); `gather_partials`: vocab parallel.
template <class T>
size_t fused_linear_workspace_bytes(const FusedLinearInputs<T>& in, const LinearHead<T>& head,
                                    const FusedLinearConfig& cfg = {},
                                    const RowPartialsAllGather& gather_partials = {}) {
  detail::FusedLayout l = detail::FusedLayout::of(
      FusedLinearArguments<T>{in, head, {}, {}, cfg, {{}, gather_partials}});
  l.bias_grad = true;
  return detail::fused_workspace_bytes(l, head, cfg);
}

/// workspace_bytes() of the step's arguments with these outputs: exact (less without db).
template <class T>
size_t fused_linear_workspace_bytes(const FusedLinearInputs<T>& in, const LinearHead<T>& head,
                                    const FusedLinearOutputs& out,
                                    const FusedLinearConfig& cfg = {},
                                    const RowPartialsAllGather& gather_partials = {}) {
  return workspace_bytes(FusedLinearArguments<T>{in, head, {}, out, cfg, {{}, gather_partials}});
}

/// run() of FusedLinearArguments{in, head, o, out, cfg, {all_reduce, gather_partials}}.
template <class T>
Status fused_linear_kto_step(cublasHandle_t handle, void* workspace, size_t& workspace_bytes,
                             const FusedLinearInputs<T>& in, const LinearHead<T>& head,
                             const Options& o, const FusedLinearOutputs& out, cudaStream_t stream,
                             const FusedLinearConfig& cfg = {}, const KlAllReduce& all_reduce = {},
                             const RowPartialsAllGather& gather_partials = {}) {
  return run(handle, workspace, workspace_bytes,
             FusedLinearArguments<T>{in, head, o, out, cfg, {all_reduce, gather_partials}}, stream);
}

// ------------------------------------------------------ forward only --

/// Forward only: logp_s and n_s of a batch from its hidden states (the
/// reference model's log-probs, or a KL batch's), never holding N × V.
/// `compact`: the layout for host targets and offsets (compact scoring).
template <class T>
size_t fused_linear_logprobs_workspace_bytes(index_t rows, const LinearHead<T>& head,
                                             const FusedLinearConfig& cfg = {},
                                             bool compact = false) {
  return detail::fused_workspace_bytes(detail::FusedLayout::forward_only(rows, compact), head, cfg);
}

namespace detail {

/// What the forward-only entries share, after their own checks: the handle, the
/// workspace (the query when null), cuBLAS bound, errors reset, the bias in fp32, the
/// offsets checked and the compact rows mapped; then run(engine, rows, chunked rows,
/// buffers) launches the entry's own work.
template <class T, class Run>
Status run_forward_only(cublasHandle_t handle, void* workspace, size_t& workspace_bytes,
                        const MatrixView<const T>& hidden, const TargetsView& targets,
                        const SequencesView& sequences, const LinearHead<T>& head, const Options& o,
                        cudaStream_t stream, const FusedLinearConfig& cfg,
                        const SequenceTokenStatistics& statistics, const index_t* host_offsets,
                        const index_t* host_targets, const char* fn, Run&& run) {
  if (handle == nullptr)
    return Status::make(StatusCode::invalid_argument,
                        "%s: argument 'handle' must be a cuBLAS handle; got nullptr", fn);
  Status status;
  const CompactPlan compact =
      compact_plan(host_targets, targets.rows, host_offsets, sequences.count, o.ignore_index);
  if (!workspace_ready(
          workspace, workspace_bytes,
          fused_workspace_bytes(FusedLayout::forward_only(hidden.rows, compact.on), head, cfg),
          status, fn))
    return status;
  Carver c(workspace);
  const FusedBuffers b =
      carve_fused(c, FusedLayout::forward_only(hidden.rows, compact.on), head, cfg);
  status = bind_cublas(handle, stream, b.cublas, cfg.cublas_workspace_bytes, fn);
  if (!status) return status;
  reset_errors(b.errors, stream);
  if (head.bias.size)
    device::convert_kernel<T, float>
        <<<256, 256, 0, stream>>>(head.bias.data, b.bias, head.weight.rows);
  launch_validate_offsets(sequences, hidden.rows, b.errors, 0u, stream);
  ChunkEngine<T> engine(handle, head, cfg, hidden.rows, b,
                        row_extras(o, b.row_entropy, b.row_mean_logit, statistics), stream, fn);
  const device::BatchRows rows{targets, sequences, hidden.rows, o.ignore_index};
  launch_compact_rows(compact, rows, b.row_of, b.errors, 0u, stream);
  status = run(engine, rows, compact.on ? compact.rows() : hidden.rows, b);
  if (!status) return status;
  return last_launch(fn);
}

}  // namespace detail

/// With host copies of the targets and offsets (`host_offsets`, `host_targets`, the
/// targets' layout), the GEMMs multiply the scored rows only, as in the step.
template <class T>
Status fused_linear_logprobs(cublasHandle_t handle, void* workspace, size_t& workspace_bytes,
                             const MatrixView<const T>& hidden, const TargetsView& targets,
                             const SequencesView& sequences, const LinearHead<T>& head,
                             const Options& o, float* logp, index_t* num_tokens,
                             cudaStream_t stream, const FusedLinearConfig& cfg = {},
                             const SequenceTokenStatistics& statistics = {},
                             const index_t* host_offsets = nullptr,
                             const index_t* host_targets = nullptr) {
  detail::check_logit_type<T>();
  const char* fn = "kto::cuda::fused_linear_logprobs";
  try {
    detail::validate_logprobs(hidden, targets, sequences, head, o, logp, num_tokens, statistics,
                              host_offsets, host_targets, fn);
  } catch (const kto::Error& e) {
    return Status::from(e);
  }
  return detail::run_forward_only(handle, workspace, workspace_bytes, hidden, targets, sequences,
                                  head, o, stream, cfg, statistics, host_offsets, host_targets, fn,
                                  [&](detail::ChunkEngine<T>& engine, const device::BatchRows& rows,
                                      index_t chunked, const detail::FusedBuffers& b) {
                                    const Status status =
                                        engine.forward_rows(hidden, rows, 0, chunked, b.row_of,
                                                            b.row_lse, b.token_logp, 0u);
                                    if (!status) return status;
                                    engine.sequences(rows, 0, sequences.count, o.average_logprob,
                                                     b.token_logp, logp, num_tokens, 0u);
                                    return Status::success();
                                  });
}

// ------------------------------------------------- vocab parallel, gathered ahead --

/// Bytes of workspace fused_linear_row_partials() needs (`compact`: with host targets
/// and offsets): fused_linear_logprobs'.
template <class T>
size_t fused_linear_row_partials_workspace_bytes(index_t rows, const LinearHead<T>& head,
                                                 const FusedLinearConfig& cfg = {},
                                                 bool compact = false) {
  return fused_linear_logprobs_workspace_bytes(rows, head, cfg, compact);
}

/// Vocab parallel, for a caller that gathers the slices' partials itself (a JAX
/// all_gather, or an ncclAllGather ahead of the step): this slice's RowPartial of every
/// row of one batch into `partials` (hidden.rows of them, device; {0, 0} on unscored
/// rows), forward only: one GEMM pass over the slice. All-gathered rank-major (the KL
/// batch's rows first when the step uses them: uses_kl_batch(options) and a KL batch of
/// one sequence at least), they are the step's gather_partials.gathered. Its errors are
/// reported as the target batch's (read_status), whichever batch the call was for. The twin of
/// kto::cpu::fused_linear_row_partials, which takes both batches in one call. Host targets and
/// offsets: compact scoring, as in the step.
template <class T>
Status fused_linear_row_partials(cublasHandle_t handle, void* workspace, size_t& workspace_bytes,
                                 const MatrixView<const T>& hidden, const TargetsView& targets,
                                 const SequencesView& sequences, const LinearHead<T>& head,
                                 const Options& o, RowPartial<float>* partials, cudaStream_t stream,
                                 const FusedLinearConfig& cfg = {},
                                 const index_t* host_offsets = nullptr,
                                 const index_t* host_targets = nullptr) {
  detail::check_logit_type<T>();
  const char* fn = "kto::cuda::fused_linear_row_partials";
  try {
    detail::validate_row_partials(hidden, targets, sequences, head, o, partials, cfg, host_offsets,
                                  host_targets, fn);
  } catch (const kto::Error& e) {
    return Status::from(e);
  }
  return detail::run_forward_only(
      handle, workspace, workspace_bytes, hidden, targets, sequences, head, o, stream, cfg, {},
      host_offsets, host_targets, fn,
      [&](detail::ChunkEngine<T>& engine, const device::BatchRows& rows, index_t chunked,
          const detail::FusedBuffers& b) {
        if (hidden.rows > 0)  // rows no chunk visits (unscored): {0, 0}
          cudaMemsetAsync(partials, 0, sizeof(RowPartial<float>) * static_cast<size_t>(hidden.rows),
                          stream);
        return engine.partials_rows(hidden, rows, 0, chunked, b.row_of, partials, 0u);
      });
}

}  // namespace cuda
}  // namespace kto
