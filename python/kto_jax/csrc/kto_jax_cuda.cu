// kto_jax_cuda.cu — the XLA FFI handlers of kto_jax_cpu.cpp on CUDA: the same
// target names, operands, attributes and results, registered for platform "CUDA".
//
// Each handler checks XLA's buffers, widens JAX's int32 ids and offsets to the
// library's int64 on the device (num_tokens is narrowed back), takes every workspace
// from XLA's scratch allocator (ffi::ScratchAllocator: no cudaMalloc here) and makes
// one call into the binding core (kto/cuda/bind.hpp), which runs kto's CUDA host API
// on XLA's stream (ffi::PlatformStream<cudaStream_t>) — the same core kto_torch's CUDA
// op calls. A bad argument comes back as ffi::Error; device-detected errors (a target
// id out of range, a NaN logit, bad offsets) through read_status, which synchronises
// the stream once per call. The fused ops copy the ids to the host first (one more
// synchronisation): compact scoring, the GEMMs multiply the scored rows only. Vocab
// parallel: fused_linear_row_partials gives this slice's row partials, the step takes
// every slice's, all-gathered by the caller, as they are (gather_partials.gathered: it
// computes no partials of its own).
// What has run on a GPU, and when: docs/status.md.
#include <kto/cuda.hpp>
#include <kto/cuda/bind.hpp>

#include <cstdint>
#include <string>

#include "kto_jax_common.hpp"

namespace {

using namespace kto_jax;
using Stream = ffi::PlatformStream<cudaStream_t>;
namespace bind = kto::bind;

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

__global__ void partial_to_f32(const kto::KlPartial* p, float* out) {
  out[0] = static_cast<float>(p->sum);
  out[1] = static_cast<float>(p->count);
}

/// The library's per-sequence statistics ([2, B] doubles) as [2, B] float32.
__global__ void statistics_kernel(const double* sums, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = static_cast<float>(sums[i]);
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

/// The core's message as an ffi::Error: a failure of the CUDA runtime (no argument
/// named) is Internal, anything else InvalidArgument.
ffi::Error from_message(const std::string& m) {
  if (m.empty()) return ffi::Error::Success();
  return ffi::Error(
      bind::is_runtime_failure(m) ? ffi::ErrorCode::kInternal : ffi::ErrorCode::kInvalidArgument,
      m);
}

ffi::Error from_status(const kto::cuda::Status& s) {
  return from_message(s.ok() ? std::string() : std::string(s.message));
}

ffi::Error launch_error(const char* fn) {
  return from_message(bind::last_launch(fn));
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
double* statistics_scratch(Scratch& s, index_t B, ffi::ResultBuffer<ffi::F32>& out) {
  return out->element_count() == 0 ? nullptr : s.take<double>(2 * B);
}

void write_statistics(const double* sums, index_t B, ffi::ResultBuffer<ffi::F32>& out,
                      cudaStream_t stream) {
  if (sums != nullptr && B > 0)
    statistics_kernel<<<grid_for(2 * B), 256, 0, stream>>>(sums, out->typed_data(), 2 * B);
}

/// A per-sequence operand holds one value a sequence.
template <class Buffer>
ffi::Error require_count(const Buffer& b, int64_t want, const char* fn, const char* name) {
  if (static_cast<int64_t>(b.element_count()) == want) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(fn) + ": argument '" + name + "' must have " +
                                     std::to_string(want) + " entries (one per sequence); got " +
                                     std::to_string(b.element_count()));
}

/// The batch's ids on the host too (the core widens them): compact scoring.
ffi::Error compact_batch(const ffi::Buffer<ffi::S32>& targets, const ffi::Buffer<ffi::S32>& offsets,
                         cudaStream_t stream, bind::CompactBatch& out) {
  const index_t rows = targets.element_count(), B = offsets.element_count() - 1;
  return from_message(
      bind::copy_compact_batch(targets.typed_data(), rows, offsets.typed_data(), B, stream, out));
}

/// This slice's first vocabulary id (a device scalar: lax.axis_index), on the host.
ffi::Error vocab_begin_on_host(const ffi::Buffer<ffi::S32>& b, cudaStream_t stream, index_t& out) {
  int32_t value = 0;
  cudaMemcpyAsync(&value, b.typed_data(), sizeof(value), cudaMemcpyDeviceToHost, stream);
  const cudaError_t err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return from_status(kto::cuda::Status::from(err, "kto_jax: vocab_begin"));
  out = value;
  return ffi::Error::Success();
}

ffi::Error check_fused(const char* fn, const ffi::AnyBuffer& hidden, const ffi::AnyBuffer& weight,
                       const ffi::AnyBuffer& bias, bind::DType& dtype) {
  KTO_JAX_TRY(require_rank(hidden, 2, fn, "hidden", "2-D [rows, D]"));
  KTO_JAX_TRY(require_rank(weight, 2, fn, "weight", "2-D [V, D]"));
  if (weight.element_type() != hidden.element_type() ||
      bias.element_type() != hidden.element_type())
    return ffi::Error::InvalidArgument(std::string(fn) +
                                       ": hidden, weight and bias must share one dtype");
  return dtype_of(hidden.element_type(), fn, "hidden", dtype);
}

/// The head as the core takes it (a vocabulary slice from vocab_begin of vocab_total).
bind::LinearHead head_of(bind::DType dtype, const ffi::AnyBuffer& weight,
                         const ffi::AnyBuffer& bias, index_t vocab_begin = 0,
                         index_t vocab_total = 0) {
  const auto d = weight.dimensions();
  return bind::LinearHead{bind::matrix(dtype, weight.untyped_data(), d[0], d[1]),
                          bias.untyped_data(), static_cast<index_t>(bias.element_count()),
                          vocab_begin, vocab_total};
}

bind::Matrix hidden_of(bind::DType dtype, const ffi::AnyBuffer& hidden) {
  const auto d = hidden.dimensions();
  return bind::matrix(dtype, hidden.untyped_data(), d[0], d[1]);
}

/// Runs a core call of the workspace protocol: its size query, the workspace from XLA's
/// scratch allocator (into `workspace`), then the call.
template <class Call>
ffi::Error run_with_workspace(Scratch& s, void*& workspace, Call&& call) {
  size_t bytes = 0;
  KTO_JAX_TRY(from_message(call(nullptr, &bytes)));
  workspace = s.take<char>(bytes);
  if (!s.ok) return s.error();
  return from_message(call(workspace, &bytes));
}

/// A fused op's batch of hidden states: its dtype and options, the ids widened on the
/// device, and their host copies (compact scoring) that `batch` points into.
struct HiddenBatch {
  bind::DType dtype = bind::DType::f32;
  kto::Options options;
  bind::CompactBatch compact;
  bind::Batch batch;
};

ffi::Error hidden_batch(const char* fn, Scratch& s, const ffi::AnyBuffer& hidden,
                        const ffi::AnyBuffer& weight, const ffi::AnyBuffer& bias,
                        const ffi::Buffer<ffi::S32>& targets, const ffi::Buffer<ffi::S32>& offsets,
                        ffi::Span<const double> options, cudaStream_t stream, HiddenBatch& out) {
  KTO_JAX_TRY(check_fused(fn, hidden, weight, bias, out.dtype));
  KTO_JAX_TRY(decode_options(options, fn, out.options));
  const index_t rows = hidden.dimensions()[0], B = offsets.element_count() - 1;
  const int64_t* t = widen(s, targets, stream);
  const int64_t* off = widen(s, offsets, stream);
  if (!s.ok) return s.error();
  KTO_JAX_TRY(compact_batch(targets, offsets, stream, out.compact));
  out.batch =
      out.compact.applied_to({kto::targets_vector(t, static_cast<index_t>(targets.element_count())),
                              kto::sequences(off, B)});
  return ffi::Error::Success();
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
  bind::DType dtype;
  KTO_JAX_TRY(dtype_of(logits.element_type(), kLogprobs, "logits", dtype));
  kto::Options o;
  KTO_JAX_TRY(decode_options(options, kLogprobs, o));
  Scratch s{alloc};
  const index_t rows = logits.dimensions()[0], V = logits.dimensions()[1];
  const index_t B = offsets.element_count() - 1;
  const int64_t* t = widen(s, targets, stream);
  const int64_t* off = widen(s, offsets, stream);
  int64_t* n = s.take<int64_t>(B);
  const size_t bytes = bind::sequence_logprobs_workspace_bytes(rows);
  void* ws = s.take<char>(bytes);
  if (!s.ok) return s.error();
  const bind::Batch batch{kto::targets_vector(t, static_cast<index_t>(targets.element_count())),
                          kto::sequences(off, B)};
  KTO_JAX_TRY(from_message(
      bind::sequence_logprobs(bind::logits_matrix(dtype, logits.untyped_data(), rows, V), batch, o,
                              logp->typed_data(), n, nullptr, ws, bytes, stream)));
  narrow(n, num_tokens->typed_data(), B, stream);
  KTO_JAX_TRY(launch_error(kLogprobs));
  return from_message(bind::read_status(ws, batch.sequences, stream));
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
      KTO_JAX_TRY(from_status(kto::cuda::kl_partial(
          small, bytes, kto::policy_logp(policy.typed_data(), K),
          kto::reference_logp(reference.typed_data(),
                              static_cast<index_t>(reference.element_count())),
          n, o, p, stream)));
    partial_to_f32<<<1, 1, 0, stream>>>(p, partial->typed_data());
    KTO_JAX_TRY(launch_error(kKl));
    return K > 0 ? from_status(kto::cuda::read_status(small, stream)) : ffi::Error::Success();
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
  bind::DType dtype;
  KTO_JAX_TRY(dtype_of(logits.element_type(), kStep, "logits", dtype));
  kto::Options o;
  KTO_JAX_TRY(decode_options(options, kStep, o));
  const index_t rows = logits.dimensions()[0], V = logits.dimensions()[1];
  const index_t B = offsets.element_count() - 1;
  KTO_JAX_TRY(check_statistics_result(kStep, statistics->element_count(), o.token_statistics, B));
  KTO_JAX_TRY(require_count(desirable, B, kStep, "desirable"));
  Scratch s{alloc};
  const int64_t* t = widen(s, targets, stream);
  const int64_t* off = widen(s, offsets, stream);
  const int64_t* kl_n = widen(s, kl_num_tokens, stream);
  int64_t* n = s.take<int64_t>(B);
  double* sums = statistics_scratch(s, B, statistics);
  if (!s.ok) return s.error();
  bind::StepForwardCall c;
  c.logits = bind::logits_matrix(dtype, logits.untyped_data(), rows, V);
  c.batch = {kto::targets_vector(t, static_cast<index_t>(targets.element_count())),
             kto::sequences(off, B)};
  c.reference_logp = kto::make_span(reference_logp.typed_data(),
                                    static_cast<index_t>(reference_logp.element_count()));
  c.desirable = desirable.typed_data();
  c.kl.policy_logp = kto::make_span(kl_policy_logp.typed_data(),
                                    static_cast<index_t>(kl_policy_logp.element_count()));
  c.kl.reference_logp = kto::make_span(kl_reference_logp.typed_data(),
                                       static_cast<index_t>(kl_reference_logp.element_count()));
  c.kl.num_tokens = kl_n;
  if (global_kl.element_count() == 2) c.global_kl = {bind::DType::f32, global_kl.typed_data()};
  c.options = o;
  c.outputs = {metrics->typed_data(),     bind::DType::f32,
               per_example->typed_data(), n,
               row_lse->typed_data(),     sums};
  void* ws = nullptr;
  KTO_JAX_TRY(run_with_workspace(
      s, ws, [&](void* w, size_t* bytes) { return bind::step_forward(c, w, bytes, stream); }));
  narrow(n, num_tokens->typed_data(), B, stream);
  write_statistics(sums, B, statistics, stream);
  KTO_JAX_TRY(launch_error(kStep));
  return from_message(bind::read_status(ws, c.batch.sequences, stream));
}

ffi::Error StepBackwardImpl(cudaStream_t stream, ffi::ScratchAllocator alloc, ffi::AnyBuffer logits,
                            ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::S32> offsets,
                            ffi::Buffer<ffi::F32> row_lse, ffi::Buffer<ffi::F32> grad_logp,
                            ffi::Buffer<ffi::S32> num_tokens, ffi::Buffer<ffi::F32> loss_cotangent,
                            ffi::Span<const double> options, ffi::Result<ffi::AnyBuffer> dlogits) {
  KTO_JAX_TRY(require_rank(logits, 2, kStep, "logits", "2-D [rows, vocab]"));
  if (dlogits->element_type() != logits.element_type())
    return ffi::Error::InvalidArgument("kto_jax.kto_loss: dlogits must have the logits' dtype");
  bind::DType dtype;
  KTO_JAX_TRY(dtype_of(logits.element_type(), kStep, "logits", dtype));
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
  bind::BackwardCall c;
  c.logits = bind::logits_matrix(dtype, logits.untyped_data(), rows, V);
  c.batch = {kto::targets_vector(t, static_cast<index_t>(targets.element_count())),
             kto::sequences(off, B)};
  c.row_lse = row_lse.typed_data();
  c.grad_logp = g;
  c.num_tokens = n;
  c.options = o;
  c.grad = dlogits->untyped_data();
  c.grad_rows = c.logits.rows;
  KTO_JAX_TRY(from_message(bind::backward(c, stream)));
  return launch_error(kStep);
}

ffi::Error FusedLogprobsImpl(cudaStream_t stream, ffi::ScratchAllocator alloc,
                             ffi::AnyBuffer hidden, ffi::AnyBuffer weight, ffi::AnyBuffer bias,
                             ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::S32> offsets,
                             ffi::Span<const double> options, int64_t chunk_bytes,
                             ffi::ResultBuffer<ffi::F32> logp,
                             ffi::ResultBuffer<ffi::S32> num_tokens) {
  Scratch s{alloc};
  HiddenBatch h;
  KTO_JAX_TRY(
      hidden_batch(kFusedLogprobs, s, hidden, weight, bias, targets, offsets, options, stream, h));
  const index_t B = h.batch.sequences.count;
  int64_t* n = s.take<int64_t>(B);
  if (!s.ok) return s.error();
  bind::FusedLogprobsCall c;
  c.hidden = hidden_of(h.dtype, hidden);
  c.batch = h.batch;
  c.head = head_of(h.dtype, weight, bias);
  c.options = h.options;
  c.chunk_bytes = static_cast<size_t>(chunk_bytes);
  c.logp = logp->typed_data();
  c.num_tokens = n;
  void* ws = nullptr;
  KTO_JAX_TRY(run_with_workspace(s, ws, [&](void* w, size_t* bytes) {
    return bind::fused_linear_logprobs(c, w, bytes, stream);
  }));
  narrow(n, num_tokens->typed_data(), B, stream);
  KTO_JAX_TRY(launch_error(kFusedLogprobs));
  return from_message(bind::read_status(ws, c.batch.sequences, stream));
}

ffi::Error RowPartialsImpl(cudaStream_t stream, ffi::ScratchAllocator alloc, ffi::AnyBuffer hidden,
                           ffi::AnyBuffer weight, ffi::AnyBuffer bias,
                           ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::S32> offsets,
                           ffi::Buffer<ffi::S32> vocab_begin, ffi::Span<const double> options,
                           int64_t vocab_total, int64_t chunk_bytes,
                           ffi::ResultBuffer<ffi::F32> partials) {
  Scratch s{alloc};
  HiddenBatch h;
  KTO_JAX_TRY(
      hidden_batch(kPartials, s, hidden, weight, bias, targets, offsets, options, stream, h));
  index_t first = 0;
  KTO_JAX_TRY(vocab_begin_on_host(vocab_begin, stream, first));
  bind::FusedLinearCall c;
  c.hidden = hidden_of(h.dtype, hidden);
  c.batch = h.batch;
  c.head = head_of(h.dtype, weight, bias, first, vocab_total);
  c.options = h.options;
  c.chunk_bytes = static_cast<size_t>(chunk_bytes);
  static_assert(sizeof(kto::RowPartial<float>) == 2 * sizeof(float), "two floats a row");
  auto* out = reinterpret_cast<kto::RowPartial<float>*>(partials->typed_data());
  void* ws = nullptr;
  KTO_JAX_TRY(run_with_workspace(s, ws, [&](void* w, size_t* bytes) {
    return bind::fused_linear_row_partials(c, out, w, bytes, stream);
  }));
  KTO_JAX_TRY(launch_error(kPartials));
  return from_message(bind::read_status(ws, c.batch.sequences, stream));
}

ffi::Error FusedStepImpl(cudaStream_t stream, ffi::ScratchAllocator alloc, ffi::AnyBuffer hidden,
                         ffi::AnyBuffer weight, ffi::AnyBuffer bias, ffi::Buffer<ffi::S32> targets,
                         ffi::Buffer<ffi::S32> offsets, ffi::Buffer<ffi::F32> reference_logp,
                         ffi::Buffer<ffi::U8> desirable, ffi::Buffer<ffi::F32> global_kl,
                         ffi::Buffer<ffi::F32> gathered, ffi::Buffer<ffi::S32> vocab_begin,
                         ffi::Span<const double> options, int64_t vocab_total, int64_t chunk_bytes,
                         int32_t strategy, ffi::ResultBuffer<ffi::F32> metrics,
                         ffi::ResultBuffer<ffi::F32> per_example,
                         ffi::ResultBuffer<ffi::S32> num_tokens,
                         ffi::ResultBuffer<ffi::F32> row_lse,
                         ffi::ResultBuffer<ffi::F32> statistics,
                         ffi::ResultBuffer<ffi::F32> d_hidden, ffi::Result<ffi::AnyBuffer> d_weight,
                         ffi::ResultBuffer<ffi::F32> d_bias) {
  // The cheap checks first: hidden_batch() copies the ids to the host (a synchronisation).
  bind::DType dw_dtype;
  KTO_JAX_TRY(dtype_of(d_weight->element_type(), kFused, "d_weight", dw_dtype));
  if (strategy < 0 || strategy >= kto::kFusedStrategyCount)
    return ffi::Error::InvalidArgument(
        std::string(kFused) + ": argument 'strategy' must be a code in [0, " +
        std::to_string(kto::kFusedStrategyCount - 1) + "] (keep_chunk, recompute, " +
        "vocab_blocks); got " + std::to_string(strategy));
  if (global_kl.element_count() != 0 && global_kl.element_count() != 2)
    return ffi::Error::InvalidArgument(std::string(kFused) +
                                       ": argument 'global_kl' must hold (S, C): 2 elements");
  Scratch s{alloc};
  HiddenBatch h;
  KTO_JAX_TRY(hidden_batch(kFused, s, hidden, weight, bias, targets, offsets, options, stream, h));
  const index_t N = hidden.dimensions()[0], B = h.batch.sequences.count;
  KTO_JAX_TRY(
      check_statistics_result(kFused, statistics->element_count(), h.options.token_statistics, B));
  KTO_JAX_TRY(require_count(desirable, B, kFused, "desirable"));
  // Vocab parallel: [ranks, N, 2] row partials of every slice, this one among them (a
  // vocab axis of one device: the head is whole, its one slice's partials not needed).
  const bool sharded = vocab_total > weight.dimensions()[0];
  const int64_t partial_floats = sharded ? static_cast<int64_t>(gathered.element_count()) : 0;
  const int64_t ranks = N > 0 ? partial_floats / (2 * N) : 0;
  if (sharded && N > 0 && (ranks < 2 || ranks * 2 * N != partial_floats))
    return ffi::Error::InvalidArgument(
        std::string(kFused) + ": argument 'gathered' must hold [slices >= 2, " + std::to_string(N) +
        ", 2] row partials; got " + std::to_string(partial_floats) + " floats");
  int64_t* n = s.take<int64_t>(B);
  double* sums = statistics_scratch(s, B, statistics);
  if (!s.ok) return s.error();
  index_t first = 0;
  if (partial_floats > 0) KTO_JAX_TRY(vocab_begin_on_host(vocab_begin, stream, first));
  bind::FusedLinearCall c;
  c.hidden = hidden_of(h.dtype, hidden);
  c.batch = h.batch;
  c.reference_logp = kto::make_span(reference_logp.typed_data(),
                                    static_cast<index_t>(reference_logp.element_count()));
  c.desirable = desirable.typed_data();
  c.head = head_of(h.dtype, weight, bias, first, vocab_total);
  c.options = h.options;
  c.outputs = {
      metrics->typed_data(), bind::DType::f32, per_example->typed_data(), n, nullptr, sums};
  c.gradients = {d_hidden->typed_data(), d_weight->untyped_data(), dw_dtype,
                 d_bias->element_count() > 0 ? d_bias->typed_data() : nullptr};
  c.chunk_bytes = static_cast<size_t>(chunk_bytes);
  c.strategy = static_cast<kto::FusedStrategy>(strategy);
  if (global_kl.element_count() == 2) c.global_kl = {bind::DType::f32, global_kl.typed_data()};
  if (partial_floats > 0)
    c.vocab = {ranks, N, reinterpret_cast<const kto::RowPartial<float>*>(gathered.typed_data())};
  void* ws = nullptr;
  KTO_JAX_TRY(run_with_workspace(s, ws, [&](void* w, size_t* bytes) {
    return bind::fused_linear_kto_step(c, w, bytes, stream);
  }));
  narrow(n, num_tokens->typed_data(), B, stream);
  write_statistics(sums, B, statistics, stream);
  // The CUDA step keeps lse_r in its workspace; report 0 for every row (the JAX backward
  // does not need it: the gradients are outputs).
  cudaMemsetAsync(row_lse->typed_data(), 0, N * sizeof(float), stream);
  KTO_JAX_TRY(launch_error(kFused));
  return from_message(bind::read_status(ws, c.batch.sequences, stream));
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
