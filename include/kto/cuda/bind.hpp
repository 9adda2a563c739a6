// cuda/bind.hpp — the CUDA half of the binding core: each call of kto/bind/arguments.hpp
// run through kto's CUDA host API, once for every binding.
//
// A binding checks its framework's tensors, fills a call struct and calls one of:
//
//   sequence_logprobs         kto::cuda::sequence_logprobs (+ the rows' lse)
//   step_forward, backward    the logits step
//   fused_linear_kto_step     kto::cuda::FusedLinearArguments<T> run (compact scoring,
//                             global (S, C), vocab slices, dW in the input type)
//   fused_linear_row_partials a vocabulary slice's row partials, for the caller's all-gather
//   fused_linear_logprobs     forward only
//   read_status               the device's errors, one stream synchronisation
//
// Each returns the library's message (empty: success; bind/message.hpp raises it) and
// follows the library's workspace protocol: a null workspace sets *workspace_bytes.
// The dtype code picks the instantiation (float, __half, __nv_bfloat16). The metrics
// are written as the binding contract's array (kto::metrics_to_array) in float32 or
// float64: the core keeps a kto::Metrics at the end of the workspace it asks for.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <vector>

#include "../bind/arguments.hpp"
#include "../bind/compact.hpp"
#include "../bind/dtype.hpp"
#include "../bind/message.hpp"
#include "blas_handle.hpp"
#include "fused_linear.hpp"
#include "phases.hpp"
#include "status.hpp"
#include "step.hpp"

namespace kto {
namespace bind {

/// The message of the last kernel launch's failure on this thread ("" if it launched), for
/// `fn`: what a binding checks after launching kernels of its own.
inline std::string last_launch(const char* fn) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cuda::Status::from(err, fn).message);
}

namespace cuda_detail {

inline std::string message(const cuda::Status& s) {
  return s.ok() ? std::string() : std::string(s.message);
}

/// fn(T{}) for the CUDA type of `dtype`, its message; a dtype it does not take is one.
template <class Fn>
std::string dispatch(DType dtype, const char* fn_name, const char* argument, Fn&& fn) {
  return message_of(
      [&] { return dispatch_dtype<__half, __nv_bfloat16>(dtype, fn_name, argument, fn); });
}

template <class T>
MatrixView<const T> typed(const Matrix& m) {
  return MatrixView<const T>{static_cast<const T*>(m.data), m.rows, m.cols,
                             m.stride ? m.stride : m.cols};
}

template <class T>
LogitsView<const T> typed(const Logits& z) {
  return LogitsView<const T>{static_cast<const T*>(z.data), z.vocab, z.rows};
}

template <class T>
kto::LinearHead<T> typed(const LinearHead& h) {
  kto::LinearHead<T> head;
  head.weight = typed<T>(h.weight);
  head.bias = make_span(static_cast<const T*>(h.bias), h.bias_size);
  head.vocab_begin = h.vocab_begin;
  head.vocab_total = h.vocab_total;
  return head;
}

inline std::size_t round_up(std::size_t x) {
  return (x + 255) / 256 * 256;
}

/// The kto::Metrics the core keeps after the library's `bytes` of workspace.
inline Metrics* metrics_slot(void* workspace, std::size_t bytes) {
  return reinterpret_cast<Metrics*>(static_cast<char*>(workspace) + bytes);
}

template <class Out>
__global__ void metrics_kernel(const Metrics* m, Out* out) {
  double values[kMetricCount];
  metrics_to_array(*m, values);
  for (int i = 0; i < kMetricCount; ++i) out[i] = static_cast<Out>(values[i]);
}

/// The binding contract's metrics array, in the call's dtype (f32 or f64).
inline void write_metrics(const Metrics* m, const StepOutputs& out, cudaStream_t stream) {
  if (out.metrics_dtype == DType::f32)
    metrics_kernel<<<1, 1, 0, stream>>>(m, static_cast<float*>(out.metrics));
  else
    metrics_kernel<<<1, 1, 0, stream>>>(m, static_cast<double*>(out.metrics));
}

template <class In>
__global__ void global_kl_kernel(const In* given, KlPartial* p) {
  p->sum = static_cast<double>(given[0]);
  p->count = static_cast<double>(given[1]);
  p->failures = 0.0;
}

/// An all-reduced (S, C) given by the caller stands in for the local KL partial.
inline cuda::KlAllReduce global_kl_hook(const GlobalKl& g) {
  if (!g) return {};
  return [g](KlPartial* p, cudaStream_t stream) {
    if (g.dtype == DType::f32)
      global_kl_kernel<<<1, 1, 0, stream>>>(static_cast<const float*>(g.data), p);
    else
      global_kl_kernel<<<1, 1, 0, stream>>>(static_cast<const double*>(g.data), p);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? cuda::Status::success()
                              : cuda::Status::from(err, "kto::bind: global_kl");
  };
}

/// Vocab parallel: the caller's all-gathered row partials, which the step merges as they
/// are (it computes none of its own). The call has no KL batch, so each slice holds the
/// batch's rows (checked by fused_linear_kto_step below).
inline cuda::RowPartialsAllGather gathered_partials(const VocabSlices& v) {
  cuda::RowPartialsAllGather g;
  if (!v) return g;
  g.ranks = v.ranks;
  g.gathered = make_span(v.gathered, v.ranks * v.rows);
  return g;
}

inline cuda::SequenceTokenStatistics statistics_of(double* token_statistics, index_t B) {
  if (token_statistics == nullptr) return {};
  return {token_statistics, token_statistics + B};
}

/// The step's outputs over a [kExampleOutputCount, B] per-example array (null: the
/// library keeps them in its workspace).
inline void fill_step_outputs(cuda::StepOutputs& out, Metrics* m, const StepOutputs& o, index_t B) {
  float* pe = o.per_example;
  out.metrics = m;
  out.logp = pe;
  if (pe) out.examples = {pe + B, pe + 2 * B, pe + 3 * B, pe + 4 * B};
  out.num_tokens = o.num_tokens;
  out.token_statistics = statistics_of(o.token_statistics, B);
}

template <class T>
cuda::FusedLinearArguments<T> fused_arguments(const FusedLinearCall& c, Metrics* m) {
  cuda::FusedLinearArguments<T> a;
  const index_t B = c.batch.sequences.count;
  a.inputs.hidden = typed<T>(c.hidden);
  a.inputs.targets = c.batch.targets;
  a.inputs.sequences = c.batch.sequences;
  a.inputs.host_offsets = c.batch.host_offsets;
  a.inputs.host_targets = c.batch.host_targets;
  a.inputs.reference_logp = kto::reference_logp(c.reference_logp);
  a.inputs.desirable = c.desirable;
  // No KL batch of its own (z0 comes from global_kl or the options): an empty one the
  // checks accept; its offsets pointer is never read with no sequence.
  const index_t N = c.hidden.rows, D = c.hidden.cols, V = c.head.weight.rows;
  a.inputs.kl.hidden = MatrixView<const T>{nullptr, 0, D, D};
  a.inputs.kl.targets = targets_vector(nullptr, 0);
  a.inputs.kl.sequences = SequencesView{c.batch.sequences.offsets, 0};
  a.head = typed<T>(c.head);
  a.options = c.options;
  fill_step_outputs(a.outputs, m, c.outputs, B);
  const LinearGradients& g = c.gradients;
  a.outputs.d_hidden = matrix_view(g.d_hidden, N, D);
  if (g.d_weight && g.d_weight_dtype == DType::f32)
    a.outputs.d_weight = matrix_view(static_cast<float*>(g.d_weight), V, D);
  else if (g.d_weight)  // vocab_blocks: each block of dW rounded once to the input type
    a.outputs.d_weight_in_input_type = MatrixView<void>{g.d_weight, V, D, D};
  if (g.d_bias) a.outputs.d_bias = make_span(g.d_bias, V);
  a.config.chunk_bytes = c.chunk_bytes;
  a.config.strategy = c.strategy;
  a.hooks.kl_all_reduce = global_kl_hook(c.global_kl);
  if (a.head.sharded())  // a whole head (a vocab axis of one device) needs no partials
    a.hooks.gather_partials = gathered_partials(c.vocab);
  return a;
}

}  // namespace cuda_detail

/// Workspace bytes of sequence_logprobs() for this many rows.
inline std::size_t sequence_logprobs_workspace_bytes(index_t rows) {
  return cuda::sequence_logprobs_workspace_bytes(rows);
}

/// Per-sequence logp and counts; each row's lse into row_lse when non-null (0 where not
/// scored).
inline std::string sequence_logprobs(const Logits& logits, const Batch& batch, const Options& o,
                                     float* logp, index_t* num_tokens, float* row_lse,
                                     void* workspace, std::size_t workspace_bytes,
                                     cudaStream_t stream) {
  const char* fn = "kto::cuda::sequence_logprobs";
  return cuda_detail::dispatch(logits.dtype, fn, "logits", [&](auto tag) -> std::string {
    using T = decltype(tag);
    std::size_t bytes = workspace_bytes;
    const auto s =
        cuda::sequence_logprobs<T>(workspace, bytes, cuda_detail::typed<T>(logits), batch.targets,
                                   batch.sequences, o, logp, num_tokens, stream);
    if (!s.ok()) return cuda_detail::message(s);
    const index_t rows = logits.rows.rows;
    if (row_lse != nullptr && rows > 0)
      cudaMemcpyAsync(row_lse, cuda::workspace_row_lse(workspace), rows * sizeof(float),
                      cudaMemcpyDeviceToDevice, stream);
    return last_launch(fn);
  });
}

/// The logits step's forward; the KL batch as log-probs or global_kl.
inline std::string step_forward(const StepForwardCall& c, void* workspace,
                                std::size_t* workspace_bytes, cudaStream_t stream) {
  const char* fn = "kto::cuda::step_forward";
  return cuda_detail::dispatch(c.logits.dtype, fn, "logits", [&](auto tag) -> std::string {
    using T = decltype(tag);
    const index_t B = c.batch.sequences.count;
    cuda::StepInputs<T> in;
    in.policy_logits = cuda_detail::typed<T>(c.logits);
    in.targets = c.batch.targets;
    in.sequences = c.batch.sequences;
    in.reference_logp = kto::reference_logp(c.reference_logp);
    in.desirable = c.desirable;
    if (!c.global_kl) {  // else the caller's (S, C) stands in for the KL batch
      in.kl.policy_logp = kto::policy_logp(c.kl.policy_logp);
      in.kl.num_tokens = c.kl.num_tokens;
      in.kl.reference_logp = kto::reference_logp(c.kl.reference_logp);
    }
    const std::size_t step_bytes = cuda_detail::round_up(cuda::kto_step_workspace_bytes(in));
    if (workspace == nullptr) {
      *workspace_bytes = step_bytes + sizeof(Metrics);
      return std::string();
    }
    Metrics* m = cuda_detail::metrics_slot(workspace, step_bytes);
    cuda::StepOutputs out;
    cuda_detail::fill_step_outputs(out, m, c.outputs, B);
    out.row_lse = c.outputs.row_lse;
    std::size_t bytes = step_bytes;
    const auto s = cuda::step_forward<T>(workspace, bytes, in, c.options, out, stream,
                                         cuda_detail::global_kl_hook(c.global_kl));
    if (!s.ok()) return cuda_detail::message(s);
    cuda_detail::write_metrics(m, c.outputs, stream);
    return last_launch(fn);
  });
}

/// dlogits (the logits' dtype, grad_rows' layout) from the forward's residuals.
inline std::string backward(const BackwardCall& c, cudaStream_t stream) {
  return cuda_detail::dispatch(
      c.logits.dtype, "kto::cuda::backward", "logits", [&](auto tag) -> std::string {
        using T = decltype(tag);
        const LogitsView<T> grad{static_cast<T*>(c.grad), c.logits.vocab, c.grad_rows};
        return cuda_detail::message(
            cuda::backward<T>(cuda_detail::typed<T>(c.logits), c.batch.targets, c.batch.sequences,
                              c.row_lse, c.grad_logp, c.num_tokens, c.options, grad, stream));
      });
}

/// The fused-linear step: metrics, per-example outputs and the head's gradients.
inline std::string fused_linear_kto_step(const FusedLinearCall& c, void* workspace,
                                         std::size_t* workspace_bytes, cudaStream_t stream) {
  const char* fn = "kto::cuda::fused_linear_kto_step";
  if (c.gradients.d_weight && c.gradients.d_weight_dtype != DType::f32 &&
      c.gradients.d_weight_dtype != c.hidden.dtype)
    return std::string(fn) + ": argument 'd_weight' must be float32 or hidden's dtype (" +
           dtype_name(c.hidden.dtype) + "); got " + dtype_name(c.gradients.d_weight_dtype);
  if (c.vocab && c.head.vocab_total > c.head.weight.rows && c.vocab.rows != c.hidden.rows)
    return std::string(fn) + ": argument 'vocab.rows' must equal hidden.rows (" +
           std::to_string(c.hidden.rows) + ", the rows of each slice's partials); got " +
           std::to_string(c.vocab.rows);
  return cuda_detail::dispatch(c.hidden.dtype, fn, "hidden", [&](auto tag) -> std::string {
    using T = decltype(tag);
    const auto query = cuda_detail::fused_arguments<T>(c, nullptr);
    const std::size_t step_bytes = cuda_detail::round_up(cuda::workspace_bytes(query));
    if (workspace == nullptr) {
      *workspace_bytes = step_bytes + sizeof(Metrics);
      return std::string();
    }
    Metrics* m = cuda_detail::metrics_slot(workspace, step_bytes);
    const auto args = cuda_detail::fused_arguments<T>(c, m);
    cublasHandle_t handle = nullptr;
    const auto hs = cuda::shared_blas_handle(&handle);
    if (!hs.ok()) return cuda_detail::message(hs);
    std::size_t bytes = step_bytes;
    const auto s = cuda::run(handle, workspace, bytes, args, stream);
    if (!s.ok()) return cuda_detail::message(s);
    cuda_detail::write_metrics(m, c.outputs, stream);
    return last_launch(fn);
  });
}

namespace cuda_detail {

/// The forward-only calls' shared frame: dtype dispatch, the chunk budget, the workspace
/// query (the library's forward-only layout, compact when host ids are given), the shared
/// cuBLAS handle, then run(handle, head, cfg) with the typed head.
template <class Run>
std::string forward_only(const Matrix& hidden, const LinearHead& h, const Batch& batch,
                         std::size_t chunk_bytes, void* workspace, std::size_t* workspace_bytes,
                         const char* fn, Run&& run) {
  return dispatch(hidden.dtype, fn, "hidden", [&](auto tag) -> std::string {
    using T = decltype(tag);
    const auto head = typed<T>(h);
    cuda::FusedLinearConfig cfg;
    cfg.chunk_bytes = chunk_bytes;
    if (workspace == nullptr) {
      *workspace_bytes = cuda::fused_linear_logprobs_workspace_bytes(
          hidden.rows, head, cfg, batch.host_offsets != nullptr && batch.host_targets != nullptr);
      return std::string();
    }
    cublasHandle_t handle = nullptr;
    const auto hs = cuda::shared_blas_handle(&handle);
    if (!hs.ok()) return message(hs);
    return message(run(handle, typed<T>(hidden), head, cfg));
  });
}

}  // namespace cuda_detail

/// A vocabulary slice's row partials of the call's batch (`partials`, hidden.rows of them;
/// {0, 0} on unscored rows), for the caller to all-gather and hand to
/// fused_linear_kto_step as `vocab`: kto::cuda::fused_linear_row_partials, one forward
/// GEMM pass over the slice. Only the batch, the head, the options and chunk_bytes are
/// read; host targets and offsets, when given, turn compact scoring on.
inline std::string fused_linear_row_partials(const FusedLinearCall& c, RowPartial<float>* partials,
                                             void* workspace, std::size_t* workspace_bytes,
                                             cudaStream_t stream) {
  return cuda_detail::forward_only(
      c.hidden, c.head, c.batch, c.chunk_bytes, workspace, workspace_bytes,
      "kto::cuda::fused_linear_row_partials",
      [&](cublasHandle_t handle, const auto& hidden, const auto& head, const auto& cfg) {
        return cuda::fused_linear_row_partials(
            handle, workspace, *workspace_bytes, hidden, c.batch.targets, c.batch.sequences, head,
            c.options, partials, stream, cfg, c.batch.host_offsets, c.batch.host_targets);
      });
}

/// Forward only: logp [B] and num_tokens [B] from hidden states and the head.
inline std::string fused_linear_logprobs(const FusedLogprobsCall& c, void* workspace,
                                         std::size_t* workspace_bytes, cudaStream_t stream) {
  return cuda_detail::forward_only(
      c.hidden, c.head, c.batch, c.chunk_bytes, workspace, workspace_bytes,
      "kto::cuda::fused_linear_logprobs",
      [&](cublasHandle_t handle, const auto& hidden, const auto& head, const auto& cfg) {
        return cuda::fused_linear_logprobs(handle, workspace, *workspace_bytes, hidden,
                                           c.batch.targets, c.batch.sequences, head, c.options,
                                           c.logp, c.num_tokens, stream, cfg, {},
                                           c.batch.host_offsets, c.batch.host_targets);
      });
}

/// Synchronises the stream and reports the errors the kernels recorded in `workspace`
/// (rows mapped to their sequences by the batch's device offsets).
inline std::string read_status(const void* workspace, const SequencesView& sequences,
                               cudaStream_t stream) {
  return cuda_detail::message(cuda::read_status(workspace, stream, sequences));
}

/// Compact scoring from device ids of any integer type: host copies of `rows` targets
/// (contiguous) and `count` + 1 offsets into `out` (synchronises the stream).
template <class I>
std::string copy_compact_batch(const I* targets, index_t rows, const I* offsets, index_t count,
                               cudaStream_t stream, CompactBatch& out) {
  std::vector<I> t(static_cast<std::size_t>(rows)), off(static_cast<std::size_t>(count + 1));
  if (rows > 0)
    cudaMemcpyAsync(t.data(), targets, sizeof(I) * t.size(), cudaMemcpyDeviceToHost, stream);
  cudaMemcpyAsync(off.data(), offsets, sizeof(I) * off.size(), cudaMemcpyDeviceToHost, stream);
  const cudaError_t err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess)
    return cuda_detail::message(cuda::Status::from(err, "kto::bind::copy_compact_batch"));
  out = CompactBatch::of(t.data(), rows, off.data(), count);
  return std::string();
}

}  // namespace bind
}  // namespace kto
