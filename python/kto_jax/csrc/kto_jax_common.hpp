// kto_jax_common.hpp — what the CPU and CUDA XLA FFI handlers of kto_jax share:
// the option attributes (one list, so both platforms bind the same names), the
// metrics layout and the error conversion. The library below stays
// framework-free; only this binding sees XLA's headers.
#pragma once

#include <kto/bind/dtype.hpp>
#include <kto/error.hpp>
#include <kto/layout.hpp>
#include <kto/metrics.hpp>
#include <kto/options.hpp>

#include <cstdint>
#include <exception>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace kto_jax {

namespace ffi = xla::ffi;
using kto::index_t;

/// Every op takes its options as one attribute, "options": the binding contract's
/// array of kto::kOptionCount doubles (kto/options.hpp, kto_jax.KTOOptions.values()),
/// decoded and checked by kto::options_from_array, as kto_torch's ops take theirs.
#define KTO_JAX_OPTIONS_ATTR .Attr<ffi::Span<const double>>("options")

/// The batches the ops read, in argument order: logits, targets, offsets; or hidden
/// states, the head's weight and bias, targets, offsets.
#define KTO_JAX_ARGS_LOGITS_BATCH \
  .Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>()
#define KTO_JAX_ARGS_HIDDEN_BATCH   \
  .Arg<ffi::AnyBuffer>()            \
      .Arg<ffi::AnyBuffer>()        \
      .Arg<ffi::AnyBuffer>()        \
      .Arg<ffi::Buffer<ffi::S32>>() \
      .Arg<ffi::Buffer<ffi::S32>>()

/// The argument, attribute and result lists of each op, bound once for both platforms:
/// `ctx` is ffi::Ffi::Bind() on the CPU, with the stream and scratch allocator on CUDA.
#define KTO_JAX_BIND_SEQUENCE_LOGPROBS(ctx)                                         \
  (ctx) KTO_JAX_ARGS_LOGITS_BATCH KTO_JAX_OPTIONS_ATTR.Ret<ffi::Buffer<ffi::F32>>() \
      .Ret<ffi::Buffer<ffi::S32>>()

#define KTO_JAX_BIND_KL_PARTIAL(ctx) \
  (ctx)                              \
      .Arg<ffi::Buffer<ffi::F32>>()  \
      .Arg<ffi::Buffer<ffi::F32>>()  \
      .Arg<ffi::Buffer<ffi::S32>>()  \
      .Attr<int32_t>("kl_estimator") \
      .Ret<ffi::Buffer<ffi::F32>>()

#define KTO_JAX_BIND_STEP_FORWARD(ctx)                                                \
  (ctx) KTO_JAX_ARGS_LOGITS_BATCH.Arg<ffi::Buffer<ffi::F32>>()                        \
      .Arg<ffi::Buffer<ffi::U8>>()                                                    \
      .Arg<ffi::Buffer<ffi::F32>>()                                                   \
      .Arg<ffi::Buffer<ffi::F32>>()                                                   \
      .Arg<ffi::Buffer<ffi::S32>>()                                                   \
      .Arg<ffi::Buffer<ffi::F32>>() KTO_JAX_OPTIONS_ATTR.Ret<ffi::Buffer<ffi::F32>>() \
      .Ret<ffi::Buffer<ffi::F32>>()                                                   \
      .Ret<ffi::Buffer<ffi::S32>>()                                                   \
      .Ret<ffi::Buffer<ffi::F32>>()                                                   \
      .Ret<ffi::Buffer<ffi::F32>>()

#define KTO_JAX_BIND_STEP_BACKWARD(ctx)                        \
  (ctx) KTO_JAX_ARGS_LOGITS_BATCH.Arg<ffi::Buffer<ffi::F32>>() \
      .Arg<ffi::Buffer<ffi::F32>>()                            \
      .Arg<ffi::Buffer<ffi::S32>>()                            \
      .Arg<ffi::Buffer<ffi::F32>>() KTO_JAX_OPTIONS_ATTR.Ret<ffi::AnyBuffer>()

#define KTO_JAX_BIND_FUSED_LINEAR_LOGPROBS(ctx)                                     \
  (ctx) KTO_JAX_ARGS_HIDDEN_BATCH KTO_JAX_OPTIONS_ATTR.Attr<int64_t>("chunk_bytes") \
      .Ret<ffi::Buffer<ffi::F32>>()                                                 \
      .Ret<ffi::Buffer<ffi::S32>>()

#define KTO_JAX_BIND_FUSED_LINEAR_ROW_PARTIALS(ctx)            \
  (ctx) KTO_JAX_ARGS_HIDDEN_BATCH.Arg<ffi::Buffer<ffi::S32>>() \
      KTO_JAX_OPTIONS_ATTR.Attr<int64_t>("vocab_total")        \
          .Attr<int64_t>("chunk_bytes")                        \
          .Ret<ffi::Buffer<ffi::F32>>()

/// The fused step: the target batch, its reference log-probs and labels, then the KL
/// batch's all-reduced (S, C) (or none), the gathered row partials (vocab parallel, or
/// none) and this slice's first vocabulary id. dW is float32, or with vocab_blocks on CUDA
/// the input dtype.
#define KTO_JAX_BIND_FUSED_LINEAR_STEP(ctx)                                           \
  (ctx) KTO_JAX_ARGS_HIDDEN_BATCH.Arg<ffi::Buffer<ffi::F32>>()                        \
      .Arg<ffi::Buffer<ffi::U8>>()                                                    \
      .Arg<ffi::Buffer<ffi::F32>>()                                                   \
      .Arg<ffi::Buffer<ffi::F32>>()                                                   \
      .Arg<ffi::Buffer<ffi::S32>>() KTO_JAX_OPTIONS_ATTR.Attr<int64_t>("vocab_total") \
      .Attr<int64_t>("chunk_bytes")                                                   \
      .Attr<int32_t>("strategy")                                                      \
      .Ret<ffi::Buffer<ffi::F32>>()                                                   \
      .Ret<ffi::Buffer<ffi::F32>>()                                                   \
      .Ret<ffi::Buffer<ffi::S32>>()                                                   \
      .Ret<ffi::Buffer<ffi::F32>>()                                                   \
      .Ret<ffi::Buffer<ffi::F32>>()                                                   \
      .Ret<ffi::Buffer<ffi::F32>>()                                                   \
      .Ret<ffi::AnyBuffer>()                                                          \
      .Ret<ffi::Buffer<ffi::F32>>()

/// Metric count and order: the library's (kto::kMetricNames; kto_jax.METRIC_NAMES).
constexpr int kNumMetrics = kto::kMetricCount;

template <class Out>
void metrics_values(const kto::Metrics& m, Out* out) {
  double v[kNumMetrics];
  kto::metrics_to_array(m, v);
  for (int i = 0; i < kNumMetrics; ++i) out[i] = static_cast<Out>(v[i]);
}

/// The token-statistics result holds [2, B] floats when the options ask for them, else none
/// (kto_jax's wrappers size it so; a direct ffi_call might not).
inline ffi::Error check_statistics_result(const char* fn, size_t count, bool requested,
                                          int64_t sequences) {
  const size_t want = requested ? 2 * static_cast<size_t>(sequences) : 0;
  if (count == want) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(
      std::string(fn) + ": the token statistics result must hold " + std::to_string(want) +
      " elements ([2, B] with options.token_statistics, else none); got " + std::to_string(count));
}

/// Runs fn(); kto::Error (a bad argument, non-finite logits) becomes
/// InvalidArgument with the library's message, anything else Internal.
template <class Fn>
ffi::Error guarded(Fn&& fn) {
  try {
    return fn();
  } catch (const kto::Error& e) {
    return ffi::Error::InvalidArgument(e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("kto_jax: ") + e.what());
  }
}

/// Returns the error of an ffi::Error-valued expression from the calling handler.
#define KTO_JAX_TRY(expr)         \
  do {                            \
    ffi::Error e_ = (expr);       \
    if (!e_.success()) return e_; \
  } while (0)

/// The call's options, decoded from the "options" attribute; a malformed array (its
/// count, a code, a value) is InvalidArgument naming `fn` and "options.<name>".
inline ffi::Error decode_options(ffi::Span<const double> values, const char* fn,
                                 kto::Options& out) {
  return guarded([&] {
    out = kto::options_from_array(values.begin(), static_cast<index_t>(values.size()), fn);
    return ffi::Error::Success();
  });
}

/// The binding core's code of an XLA element type (bind/dtype.hpp); false for a type
/// the library has no code for.
inline bool dtype_code(ffi::DataType dtype, kto::bind::DType& code) {
  switch (dtype) {
    case ffi::DataType::F32:
      code = kto::bind::DType::f32;
      return true;
    case ffi::DataType::BF16:
      code = kto::bind::DType::bf16;
      return true;
    case ffi::DataType::F16:
      code = kto::bind::DType::f16;
      return true;
    case ffi::DataType::F64:
      code = kto::bind::DType::f64;
      return true;
    default:
      return false;
  }
}

/// The argument's dtype as the core's code (the ops take float32, bfloat16 and float16),
/// or InvalidArgument naming `fn` and `arg`.
inline ffi::Error dtype_of(ffi::DataType dtype, const char* fn, const char* arg,
                           kto::bind::DType& code) {
  const bool known = dtype_code(dtype, code);
  if (known && code != kto::bind::DType::f64) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(fn) + ": argument '" + arg + "' must be " +
                                     kto::bind::dtype_expectation(false) + "; got " +
                                     (known ? kto::bind::dtype_name(code) : "another dtype"));
}

/// Calls fn(T{}) with the element type `dtype`: the core's dispatch (bind/dtype.hpp) over
/// float and the platform's bfloat16 and half types (Eigen's on the CPU, CUDA's on the GPU).
template <class Bf16, class Half, class Fn>
ffi::Error dispatch_float(ffi::DataType dtype, const char* fn_name, const char* arg, Fn&& fn) {
  kto::bind::DType code;
  KTO_JAX_TRY(dtype_of(dtype, fn_name, arg, code));
  return guarded([&]() -> ffi::Error {
    return kto::bind::dispatch_dtype<Half, Bf16>(code, fn_name, arg, fn);
  });
}

template <class T>
kto::LogitsView<const T> logits_of(const ffi::AnyBuffer& b) {
  const auto d = b.dimensions();
  return kto::logits_matrix<const T>(static_cast<const T*>(b.untyped_data()), d[0], d[1]);
}

template <class T>
kto::MatrixView<const T> matrix_of(const ffi::AnyBuffer& b) {
  const auto d = b.dimensions();
  return kto::matrix_view<const T>(static_cast<const T*>(b.untyped_data()), d[0], d[1]);
}

inline ffi::Error require_rank(const ffi::AnyBuffer& b, size_t rank, const char* fn,
                               const char* name, const char* shape) {
  if (b.dimensions().size() == rank) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(fn) + ": argument '" + name + "' must be " +
                                     shape + "; got rank " + std::to_string(b.dimensions().size()));
}

}  // namespace kto_jax
