// kto_jax_cuda.cu — the XLA FFI handlers of kto_jax_cpu.cpp on CUDA: the same
// target names, operands, attributes and results, registered for platform "CUDA".
//
// Each handler runs kto's CUDA host API on the stream XLA gives
// (ffi::PlatformStream<cudaStream_t>), takes every workspace from XLA's scratch
// allocator (ffi::ScratchAllocator: no cudaMalloc here), and returns a bad
// argument as ffi::Error. Device-detected errors (a target id out of range, a
// NaN logit, bad offsets) come back through kto::cuda::read_status, which
// synchronises the stream once per call, as kto_torch's CUDA op does.
// JAX's int32 ids and offsets are widened to the library's int64 on the
// device; num_tokens is narrowed back.
//
// Not implemented in these handlers (an error says so): the vocab-parallel row
// partials and a sharded head. The library's CUDA step has the gather hook
// (RowPartialsAllGather); these handlers do not wire it to XLA yet (issue 24).
// What has run on a GPU, and when: docs/status.md.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <kto/cuda.hpp>
#include <kto/cuda/fused_linear.hpp>

#include <cstdint>
#include <string>

#include "kto_jax_common.hpp"

namespace {

using namespace kto_jax;
using Stream = ffi::PlatformStream<cudaStream_t>;

// ------------------------------------------------------------------ kernels --

__global__ void widen_kernel(const int32_t* in, int64_t* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = in[i];
}

__global__ void narrow_kernel(const int64_t* in, int32_t* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = static_cast<int32_t>(in[i]);
}

/// The metrics array of the binding contract (kto::metrics_to_array), in float32.
__global__ void metrics_kernel(const kto::Metrics* m, float* out) {
  double values[kto::kMetricCount];
  kto::metrics_to_array(*m, values);
  for (int i = 0; i < kto::kMetricCount; ++i) out[i] = static_cast<float>(values[i]);
}

__global__ void partial_to_f32(const kto::KlPartial* p, float* out) {
  out[0] = static_cast<float>(p->sum);
  out[1] = static_cast<float>(p->count);
}

__global__ void partial_from_f32(const float* g, kto::KlPartial* p) {
  p->sum = g[0];
  p->count = g[1];
  p->failures = 0.0;
}

/// The library's per-sequence statistics (doubles) as rows of [2, B] in float32.
__global__ void statistics_kernel(const double* entropy_sum, const double* mean_logit_sum,
                                  float* out, int64_t B) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B;
       i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = static_cast<float>(entropy_sum[i]);
    out[B + i] = static_cast<float>(mean_logit_sum[i]);
  }
}

__global__ void scale_kernel(const float* in, const float* factor, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = in[i] * factor[0];
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 4096 ? 4096 : blocks));
}

// ------------------------------------------------------------------ helpers --

/// Scratch memory from XLA; `ok` turns false on the first failed allocation.
struct Scratch {
  ffi::ScratchAllocator& alloc;
  bool ok = true;
  template <class T>
  T* take(size_t n) {
    if (n == 0) return nullptr;
    auto p = alloc.Allocate(n * sizeof(T), 256);
    if (!p.has_value()) {
      ok = false;
      return nullptr;
    }
    return static_cast<T*>(*p);
  }
  ffi::Error error() const {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "kto_jax: XLA's scratch allocator could not provide a workspace");
  }
};

ffi::Error to_error(const kto::cuda::Status& s) {
  if (s.ok()) return ffi::Error::Success();
  const bool internal = s.code == kto::cuda::StatusCode::cuda_error;
  return ffi::Error(internal ? ffi::ErrorCode::kInternal : ffi::ErrorCode::kInvalidArgument,
                    s.message);
}

ffi::Error launch_error(const char* fn) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(fn) + ": " + cudaGetErrorString(e));
}

const int64_t* widen(Scratch& s, const ffi::Buffer<ffi::S32>& b, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(b.element_count());
  int64_t* out = s.take<int64_t>(n);
  if (out) widen_kernel<<<grid_for(n), 256, 0, stream>>>(b.typed_data(), out, n);
  return out;
}

void narrow(const int64_t* in, int32_t* out, int64_t n, cudaStream_t stream) {
  if (n > 0) narrow_kernel<<<grid_for(n), 256, 0, stream>>>(in, out, n);
}

/// Device doubles for the library's statistics when the result asks for them ([2, B]).
kto::cuda::SequenceTokenStatistics statistics_scratch(Scratch& s, index_t B,
                                                      ffi::ResultBuffer<ffi::F32>& out) {
  if (out->element_count() == 0) return {};
  double* p = s.take<double>(2 * B);
  return {p, p ? p + B : nullptr};
}

void write_statistics(const kto::cuda::SequenceTokenStatistics& st, index_t B,
                      ffi::ResultBuffer<ffi::F32>& out, cudaStream_t stream) {
  if (st.entropy_sum != nullptr && B > 0)
    statistics_kernel<<<grid_for(B), 256, 0, stream>>>(st.entropy_sum, st.mean_logit_sum,
                                                       out->typed_data(), B);
}

template <class Fn>
ffi::Error dispatch(ffi::DataType dtype, const char* fn_name, const char* arg, Fn&& fn) {
  return dispatch_float<__nv_bfloat16, __half>(dtype, fn_name, arg, fn);
}

constexpr const char* kLogprobs = "kto_jax.sequence_logprobs";
constexpr const char* kKl = "kto_jax.kl_partial";
constexpr const char* kStep = "kto_jax.kto_loss";
constexpr const char* kFused = "kto_jax.fused_linear_kto_loss";
constexpr const char* kFusedLogprobs = "kto_jax.fused_linear_logprobs";
constexpr const char* kPartials = "kto_jax.fused_linear_row_partials";

// ----------------------------------------------------------------- handlers --

ffi::Error SequenceLogprobsImpl(cudaStream_t stream, ffi::ScratchAllocator alloc,
                                ffi::AnyBuffer logits, ffi::Buffer<ffi::S32> targets,
                                ffi::Buffer<ffi::S32> offsets, ffi::Span<const double> options,
                                ffi::ResultBuffer<ffi::F32> logp,
                                ffi::ResultBuffer<ffi::S32> num_tokens) {
  KTO_JAX_TRY(require_rank(logits, 2, kLogprobs, "logits", "2-D [rows, vocab]"));
  Scratch s{alloc};
  const index_t rows = logits.dimensions()[0], B = offsets.element_count() - 1;
  const int64_t* t = widen(s, targets, stream);
  const int64_t* off = widen(s, offsets, stream);
  int64_t* n = s.take<int64_t>(B);
  size_t bytes = kto::cuda::sequence_logprobs_workspace_bytes(rows);
  void* ws = s.take<char>(bytes);
  if (!s.ok) return s.error();
  kto::Options o;
  KTO_JAX_TRY(decode_options(options, kLogprobs, o));
  const auto seqs = kto::sequences(off, B);
  return dispatch(logits.element_type(), kLogprobs, "logits", [&](auto tag) -> ffi::Error {
    using T = decltype(tag);
    KTO_JAX_TRY(to_error(kto::cuda::sequence_logprobs<T>(ws, bytes, logits_of<T>(logits),
                                                         kto::targets_vector(t, rows), seqs, o,
                                                         logp->typed_data(), n, stream)));
    narrow(n, num_tokens->typed_data(), B, stream);
    KTO_JAX_TRY(launch_error(kLogprobs));
    return to_error(kto::cuda::read_status(ws, stream, seqs));
  });
}

ffi::Error KlPartialImpl(cudaStream_t stream, ffi::ScratchAllocator alloc,
                         ffi::Buffer<ffi::F32> policy, ffi::Buffer<ffi::F32> reference,
                         ffi::Buffer<ffi::S32> num_tokens, int32_t kl_estimator,
                         ffi::ResultBuffer<ffi::F32> partial) {
  return guarded([&]() -> ffi::Error {
    Scratch s{alloc};
    const index_t K = policy.element_count();
    const int64_t* n = widen(s, num_tokens, stream);
    auto* p = s.take<kto::KlPartial>(1);
    size_t bytes = kto::cuda::errors_workspace_bytes();  // the library's layout: an error word
    void* small = s.take<char>(bytes);
    if (!s.ok) return s.error();
    kto::Options o;
    o.kl_estimator = static_cast<kto::KlEstimator>(kl_estimator);
    cudaMemsetAsync(p, 0, sizeof(kto::KlPartial), stream);
    if (K > 0)
      KTO_JAX_TRY(to_error(kto::cuda::kl_partial(
          small, bytes, kto::policy_logp(policy.typed_data(), K),
          kto::reference_logp(reference.typed_data(),
                              static_cast<index_t>(reference.element_count())),
          n, o, p, stream)));
    partial_to_f32<<<1, 1, 0, stream>>>(p, partial->typed_data());
    KTO_JAX_TRY(launch_error(kKl));
    return K > 0 ? to_error(kto::cuda::read_status(small, stream)) : ffi::Error::Success();
  });
}

ffi::Error StepForwardImpl(cudaStream_t stream, ffi::ScratchAllocator alloc, ffi::AnyBuffer logits,
                           ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::S32> offsets,
                           ffi::Buffer<ffi::F32> reference_logp, ffi::Buffer<ffi::U8> desirable,
                           ffi::Buffer<ffi::F32> kl_policy_logp,
                           ffi::Buffer<ffi::F32> kl_reference_logp,
                           ffi::Buffer<ffi::S32> kl_num_tokens, ffi::Buffer<ffi::F32> global_kl,
                           ffi::Span<const double> options, ffi::ResultBuffer<ffi::F32> metrics,
                           ffi::ResultBuffer<ffi::F32> per_example,
                           ffi::ResultBuffer<ffi::S32> num_tokens,
                           ffi::ResultBuffer<ffi::F32> row_lse,
                           ffi::ResultBuffer<ffi::F32> statistics) {
  KTO_JAX_TRY(require_rank(logits, 2, kStep, "logits", "2-D [rows, vocab]"));
  if (global_kl.element_count() != 0 && global_kl.element_count() != 2)
    return ffi::Error::InvalidArgument(std::string(kStep) +
                                       ": argument 'global_kl' must hold (S, C): 2 elements");
  kto::Options o;
  KTO_JAX_TRY(decode_options(options, kStep, o));
  Scratch s{alloc};
  const index_t rows = logits.dimensions()[0], B = offsets.element_count() - 1;
  KTO_JAX_TRY(check_statistics_result(kStep, statistics->element_count(), o.token_statistics, B));
  const bool global = global_kl.element_count() == 2;
  const index_t K = global ? 0 : kl_policy_logp.element_count();
  const int64_t* t = widen(s, targets, stream);
  const int64_t* off = widen(s, offsets, stream);
  const int64_t* kl_n = widen(s, kl_num_tokens, stream);
  int64_t* n = s.take<int64_t>(B);
  auto* m = s.take<kto::Metrics>(1);
  const auto sums = statistics_scratch(s, B, statistics);
  if (!s.ok) return s.error();
  const auto seqs = kto::sequences(off, B);
  float* pe = per_example->typed_data();
  return dispatch(logits.element_type(), kStep, "logits", [&](auto tag) -> ffi::Error {
    using T = decltype(tag);
    kto::cuda::StepInputs<T> in;
    in.policy_logits = logits_of<T>(logits);
    in.targets = kto::targets_vector(t, rows);
    in.sequences = seqs;
    in.reference_logp = kto::reference_logp(reference_logp.typed_data(),
                                            static_cast<index_t>(reference_logp.element_count()));
    in.desirable = desirable.typed_data();
    in.kl.policy_logp = kto::policy_logp(kl_policy_logp.typed_data(), K);
    in.kl.num_tokens = kl_n;
    in.kl.reference_logp =
        kto::reference_logp(kl_reference_logp.typed_data(),
                            global ? 0 : static_cast<index_t>(kl_reference_logp.element_count()));
    kto::cuda::StepOutputs out;
    out.metrics = m;
    out.logp = pe;
    out.examples = {pe + B, pe + 2 * B, pe + 3 * B, pe + 4 * B};
    out.num_tokens = n;
    out.row_lse = row_lse->typed_data();
    out.token_statistics = sums;
    // An all-reduced (S, C) given by the caller stands in for the local KL partial.
    kto::cuda::KlAllReduce use_global;
    if (global)
      use_global = [g = global_kl.typed_data()](kto::KlPartial* p, cudaStream_t st) {
        partial_from_f32<<<1, 1, 0, st>>>(g, p);
        return kto::cuda::Status::success();
      };
    size_t bytes = kto::cuda::kto_step_workspace_bytes(in);
    void* ws = s.take<char>(bytes);
    if (!s.ok) return s.error();
    KTO_JAX_TRY(to_error(kto::cuda::step_forward<T>(ws, bytes, in, o, out, stream, use_global)));
    metrics_kernel<<<1, 1, 0, stream>>>(m, metrics->typed_data());
    narrow(n, num_tokens->typed_data(), B, stream);
    write_statistics(sums, B, statistics, stream);
    KTO_JAX_TRY(launch_error(kStep));
    return to_error(kto::cuda::read_status(ws, stream, seqs));
  });
}

ffi::Error StepBackwardImpl(cudaStream_t stream, ffi::ScratchAllocator alloc, ffi::AnyBuffer logits,
                            ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::S32> offsets,
                            ffi::Buffer<ffi::F32> row_lse, ffi::Buffer<ffi::F32> grad_logp,
                            ffi::Buffer<ffi::S32> num_tokens, ffi::Buffer<ffi::F32> loss_cotangent,
                            ffi::Span<const double> options, ffi::Result<ffi::AnyBuffer> dlogits) {
  KTO_JAX_TRY(require_rank(logits, 2, kStep, "logits", "2-D [rows, vocab]"));
  if (dlogits->element_type() != logits.element_type())
    return ffi::Error::InvalidArgument("kto_jax.kto_loss: dlogits must have the logits' dtype");
  kto::Options o;
  KTO_JAX_TRY(decode_options(options, kStep, o));
  Scratch s{alloc};
  const index_t rows = logits.dimensions()[0], V = logits.dimensions()[1];
  const index_t B = offsets.element_count() - 1;
  const int64_t* t = widen(s, targets, stream);
  const int64_t* off = widen(s, offsets, stream);
  const int64_t* n = widen(s, num_tokens, stream);
  float* g = s.take<float>(B);
  if (!s.ok) return s.error();
  // dL_total/dlogp_s = cotangent · g_s, on the device (the cotangent is a device scalar).
  if (B > 0)
    scale_kernel<<<grid_for(B), 256, 0, stream>>>(grad_logp.typed_data(),
                                                  loss_cotangent.typed_data(), g, B);
  return dispatch(logits.element_type(), kStep, "logits", [&](auto tag) -> ffi::Error {
    using T = decltype(tag);
    const kto::LogitsView<T> grad =
        kto::logits_matrix<T>(static_cast<T*>(dlogits->untyped_data()), rows, V);
    KTO_JAX_TRY(to_error(kto::cuda::backward<T>(logits_of<T>(logits), kto::targets_vector(t, rows),
                                                kto::sequences(off, B), row_lse.typed_data(), g, n,
                                                o, grad, stream)));
    return launch_error(kStep);
  });
}

ffi::Error check_fused(const char* fn, const ffi::AnyBuffer& hidden, const ffi::AnyBuffer& weight,
                       const ffi::AnyBuffer& bias) {
  KTO_JAX_TRY(require_rank(hidden, 2, fn, "hidden", "2-D [rows, D]"));
  KTO_JAX_TRY(require_rank(weight, 2, fn, "weight", "2-D [V, D]"));
  if (weight.element_type() != hidden.element_type() ||
      bias.element_type() != hidden.element_type())
    return ffi::Error::InvalidArgument(std::string(fn) +
                                       ": hidden, weight and bias must share one dtype");
  return ffi::Error::Success();
}

template <class T>
kto::LinearHead<T> head_of(const ffi::AnyBuffer& weight, const ffi::AnyBuffer& bias) {
  kto::LinearHead<T> head;
  head.weight = matrix_of<T>(weight);
  head.bias = kto::make_span(static_cast<const T*>(bias.untyped_data()),
                             static_cast<index_t>(bias.element_count()));
  return head;
}

ffi::Error FusedLogprobsImpl(cudaStream_t stream, ffi::ScratchAllocator alloc,
                             ffi::AnyBuffer hidden, ffi::AnyBuffer weight, ffi::AnyBuffer bias,
                             ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::S32> offsets,
                             ffi::Span<const double> options, int64_t chunk_bytes,
                             ffi::ResultBuffer<ffi::F32> logp,
                             ffi::ResultBuffer<ffi::S32> num_tokens) {
  KTO_JAX_TRY(check_fused(kFusedLogprobs, hidden, weight, bias));
  Scratch s{alloc};
  const index_t rows = hidden.dimensions()[0], B = offsets.element_count() - 1;
  const int64_t* t = widen(s, targets, stream);
  const int64_t* off = widen(s, offsets, stream);
  int64_t* n = s.take<int64_t>(B);
  if (!s.ok) return s.error();
  kto::Options o;
  KTO_JAX_TRY(decode_options(options, kFusedLogprobs, o));
  const auto seqs = kto::sequences(off, B);
  return dispatch(hidden.element_type(), kFusedLogprobs, "hidden", [&](auto tag) -> ffi::Error {
    using T = decltype(tag);
    const auto head = head_of<T>(weight, bias);
    kto::cuda::FusedLinearConfig cfg;
    cfg.chunk_bytes = static_cast<size_t>(chunk_bytes);
    size_t bytes = kto::cuda::fused_linear_logprobs_workspace_bytes(rows, head, cfg);
    void* ws = s.take<char>(bytes);
    if (!s.ok) return s.error();
    cublasHandle_t handle = nullptr;
    KTO_JAX_TRY(to_error(kto::cuda::shared_blas_handle(&handle)));
    KTO_JAX_TRY(to_error(kto::cuda::fused_linear_logprobs<T>(
        handle, ws, bytes, matrix_of<T>(hidden), kto::targets_vector(t, rows), seqs, head, o,
        logp->typed_data(), n, stream, cfg)));
    narrow(n, num_tokens->typed_data(), B, stream);
    KTO_JAX_TRY(launch_error(kFusedLogprobs));
    return to_error(kto::cuda::read_status(ws, stream, seqs));
  });
}

ffi::Error RowPartialsImpl(cudaStream_t, ffi::ScratchAllocator, ffi::AnyBuffer, ffi::AnyBuffer,
                           ffi::AnyBuffer, ffi::Buffer<ffi::S32>, ffi::Buffer<ffi::S32>,
                           ffi::AnyBuffer, ffi::Buffer<ffi::S32>, ffi::Buffer<ffi::S32>,
                           ffi::Buffer<ffi::S32>, ffi::Span<const double>, int64_t, int64_t,
                           ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    std::string(kPartials) +
                        ": vocab parallel runs on the CPU only (the library's CUDA fused step "
                        "has no per-slice partials yet)");
}

ffi::Error FusedStepImpl(
    cudaStream_t stream, ffi::ScratchAllocator alloc, ffi::AnyBuffer hidden, ffi::AnyBuffer weight,
    ffi::AnyBuffer bias, ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::S32> offsets,
    ffi::Buffer<ffi::F32> reference_logp, ffi::Buffer<ffi::U8> desirable, ffi::AnyBuffer kl_hidden,
    ffi::Buffer<ffi::S32> kl_targets, ffi::Buffer<ffi::S32> kl_offsets,
    ffi::Buffer<ffi::F32> kl_reference_logp, ffi::Buffer<ffi::F32> global_kl,
    ffi::Buffer<ffi::F32> gathered, ffi::Buffer<ffi::S32>, ffi::Span<const double> options,
    int64_t vocab_total, int64_t chunk_bytes, int32_t strategy, ffi::ResultBuffer<ffi::F32> metrics,
    ffi::ResultBuffer<ffi::F32> per_example, ffi::ResultBuffer<ffi::S32> num_tokens,
    ffi::ResultBuffer<ffi::F32> row_lse, ffi::ResultBuffer<ffi::F32> statistics,
    ffi::ResultBuffer<ffi::F32> d_hidden, ffi::ResultBuffer<ffi::F32> d_weight,
    ffi::ResultBuffer<ffi::F32> d_bias) {
  KTO_JAX_TRY(check_fused(kFused, hidden, weight, bias));
  if (gathered.element_count() > 0 || vocab_total != 0)
    return ffi::Error(ffi::ErrorCode::kUnimplemented,
                      std::string(kFused) + ": vocab parallel runs on the CPU only");
  kto::Options o;
  KTO_JAX_TRY(decode_options(options, kFused, o));
  Scratch s{alloc};
  const index_t N = hidden.dimensions()[0], D = hidden.dimensions()[1];
  const index_t V = weight.dimensions()[0], B = offsets.element_count() - 1;
  KTO_JAX_TRY(check_statistics_result(kFused, statistics->element_count(), o.token_statistics, B));
  const bool global = global_kl.element_count() == 2;
  const bool kl = !global && kl_offsets.element_count() > 0;
  const int64_t* t = widen(s, targets, stream);
  const int64_t* off = widen(s, offsets, stream);
  const int64_t* kl_t = kl ? widen(s, kl_targets, stream) : nullptr;
  const int64_t* kl_off = kl ? widen(s, kl_offsets, stream) : nullptr;
  int64_t* n = s.take<int64_t>(B);
  auto* m = s.take<kto::Metrics>(1);
  const auto sums = statistics_scratch(s, B, statistics);
  if (!s.ok) return s.error();
  // keep_chunk plans its chunks over host offsets: one copy of B + 1 integers.
  std::vector<int64_t> host_offsets;
  if (strategy == static_cast<int32_t>(kto::FusedStrategy::keep_chunk)) {
    host_offsets.resize(static_cast<size_t>(B + 1));
    cudaMemcpyAsync(host_offsets.data(), off, (B + 1) * sizeof(int64_t), cudaMemcpyDeviceToHost,
                    stream);
    cudaStreamSynchronize(stream);
  }
  const auto seqs = kto::sequences(off, B);
  float* pe = per_example->typed_data();
  return dispatch(hidden.element_type(), kFused, "hidden", [&](auto tag) -> ffi::Error {
    using T = decltype(tag);
    const auto head = head_of<T>(weight, bias);
    kto::cuda::FusedLinearInputs<T> in;
    in.hidden = matrix_of<T>(hidden);
    in.targets = kto::targets_vector(t, N);
    in.sequences = seqs;
    in.host_offsets = host_offsets.empty() ? nullptr : host_offsets.data();
    in.reference_logp = kto::reference_logp(reference_logp.typed_data(),
                                            static_cast<index_t>(reference_logp.element_count()));
    in.desirable = desirable.typed_data();
    if (kl) {
      in.kl.hidden = matrix_of<T>(kl_hidden);
      in.kl.targets = kto::targets_vector(kl_t, kl_hidden.dimensions()[0]);
      in.kl.sequences = kto::sequences(kl_off, kl_offsets.element_count() - 1);
      in.kl.reference_logp = kto::reference_logp(
          kl_reference_logp.typed_data(), static_cast<index_t>(kl_reference_logp.element_count()));
    }
    kto::cuda::FusedLinearConfig cfg;
    cfg.chunk_bytes = static_cast<size_t>(chunk_bytes);
    cfg.strategy = static_cast<kto::FusedStrategy>(strategy);
    kto::cuda::FusedLinearOutputs out;
    out.metrics = m;
    out.logp = pe;
    out.num_tokens = n;
    out.examples = {pe + B, pe + 2 * B, pe + 3 * B, pe + 4 * B};
    out.d_hidden = kto::matrix_view(d_hidden->typed_data(), N, D);
    out.d_weight = kto::matrix_view(d_weight->typed_data(), V, D);
    if (d_bias->element_count() > 0) out.d_bias = kto::make_span(d_bias->typed_data(), V);
    out.token_statistics = sums;
    kto::cuda::KlAllReduce all_reduce;
    if (global) {
      const float* g = global_kl.typed_data();
      all_reduce = [g](kto::KlPartial* p, cudaStream_t st) {
        partial_from_f32<<<1, 1, 0, st>>>(g, p);
        return kto::cuda::Status::success();
      };
    }
    size_t bytes = kto::cuda::fused_linear_workspace_bytes(in, head, cfg);
    void* ws = s.take<char>(bytes);
    if (!s.ok) return s.error();
    cublasHandle_t handle = nullptr;
    KTO_JAX_TRY(to_error(kto::cuda::shared_blas_handle(&handle)));
    KTO_JAX_TRY(to_error(kto::cuda::fused_linear_kto_step<T>(handle, ws, bytes, in, head, o, out,
                                                             stream, cfg, all_reduce)));
    metrics_kernel<<<1, 1, 0, stream>>>(m, metrics->typed_data());
    narrow(n, num_tokens->typed_data(), B, stream);
    write_statistics(sums, B, statistics, stream);
    // The CUDA step keeps lse_r in its workspace; report 0 for every row until the
    // library exposes it (the JAX backward does not need it: the gradients are outputs).
    cudaMemsetAsync(row_lse->typed_data(), 0, N * sizeof(float), stream);
    KTO_JAX_TRY(launch_error(kFused));
    return to_error(kto::cuda::read_status(ws, stream, seqs));
  });
}

}  // namespace

#define KTO_JAX_CTX ffi::Ffi::Bind().Ctx<Stream>().Ctx<ffi::ScratchAllocator>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoSequenceLogprobs, SequenceLogprobsImpl,
                              KTO_JAX_BIND_SEQUENCE_LOGPROBS(KTO_JAX_CTX));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoKlPartial, KlPartialImpl, KTO_JAX_BIND_KL_PARTIAL(KTO_JAX_CTX));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoStepForward, StepForwardImpl,
                              KTO_JAX_BIND_STEP_FORWARD(KTO_JAX_CTX));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoStepBackward, StepBackwardImpl,
                              KTO_JAX_BIND_STEP_BACKWARD(KTO_JAX_CTX));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoFusedLinearLogprobs, FusedLogprobsImpl,
                              KTO_JAX_BIND_FUSED_LINEAR_LOGPROBS(KTO_JAX_CTX));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoFusedLinearRowPartials, RowPartialsImpl,
                              KTO_JAX_BIND_FUSED_LINEAR_ROW_PARTIALS(KTO_JAX_CTX));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoFusedLinearStep, FusedStepImpl,
                              KTO_JAX_BIND_FUSED_LINEAR_STEP(KTO_JAX_CTX));
