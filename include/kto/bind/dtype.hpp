// bind/dtype.hpp — a tensor's element type as a runtime code, and the one switch
// that turns the code into a template instantiation.
//
// A framework hands the binding a dtype at run time (torch::ScalarType,
// xla::ffi::DataType); the library's entry points are templates over the logit
// type T. Each binding maps its framework's dtype to a DType (one line per type)
// and calls dispatch_dtype, which calls fn(T{}) with the type of that code:
//
//   float  f32      Half  f16 (CUDA's __half, Eigen::half)
//   double f64      Bf16  bf16 (CUDA's __nv_bfloat16, Eigen::bfloat16)
//
// The 16-bit types are the platform's, given as template arguments, so this header
// needs neither CUDA nor Eigen. A code the entry point does not take is an error
// naming the function, the argument, what it takes and what came.
#pragma once

#include <string>

#include "../error.hpp"

namespace kto {
namespace bind {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::f32:
      return "float32";
    case DType::f16:
      return "float16";
    case DType::bf16:
      return "bfloat16";
    case DType::f64:
      return "float64";
  }
  return "an unknown dtype";
}

/// The logit types an entry point takes: float32, bfloat16 and float16, and float64
/// where `with_double` (the CPU path).
inline std::string dtype_expectation(bool with_double) {
  return with_double ? "float32, float64, bfloat16 or float16" : "float32, bfloat16 or float16";
}

/// Calls fn(T{}) for the type of `dtype`; Half and Bf16 are the platform's 16-bit types.
/// float64 is taken only when `with_double`. Anything else throws kto::Error naming
/// `fn_name` and `argument`.
template <class Half, class Bf16, bool with_double = false, class Fn>
auto dispatch_dtype(DType dtype, const char* fn_name, const char* argument, Fn&& fn)
    -> decltype(fn(float{})) {
  switch (dtype) {
    case DType::f32:
      return fn(float{});
    case DType::f16:
      return fn(Half{});
    case DType::bf16:
      return fn(Bf16{});
    case DType::f64:
      if constexpr (with_double) return fn(double{});
      break;
  }
  throw Error(fn_name, argument,
              std::string(fn_name) + ": argument '" + argument + "' must be " +
                  dtype_expectation(with_double) + "; got " + dtype_name(dtype));
}

}  // namespace bind
}  // namespace kto
