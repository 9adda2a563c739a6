// config.hpp — compiler plumbing shared by every kto header.
//
// The scalar KTO math is written once and compiled twice: by the host compiler
// for the Eigen CPU path and by nvcc for the CUDA kernels. KTO_HOST_DEVICE marks
// those functions; under a plain C++ compiler it expands to nothing.
#pragma once

#define KTO_VERSION_MAJOR 0
#define KTO_VERSION_MINOR 1
#define KTO_VERSION_PATCH 0

#if defined(__CUDACC__)
#define KTO_HOST_DEVICE __host__ __device__
#else
#define KTO_HOST_DEVICE
#endif

// KTO_UNROLL() or KTO_UNROLL(n) before a loop: `#pragma unroll [n]` in the device
// pass only. The host pass of a KTO_HOST_DEVICE function (the kernels' logic run
// on the CPU, tests/cpp/cuda/test_device_logic.cu) would otherwise warn of an unknown
// pragma (GCC's -Wunknown-pragmas).
#define KTO_PRAGMA_(text) _Pragma(#text)
#if defined(__CUDA_ARCH__)
#define KTO_UNROLL(...) KTO_PRAGMA_(unroll __VA_ARGS__)
#else
#define KTO_UNROLL(...)
#endif

#include <cstdint>

namespace kto {

/// Index type for rows, sequences and token ids (torch's int64 "long").
using index_t = std::int64_t;

/// Accumulation type for a logit type: fp32 for float/half/bfloat16, fp64 for double.
template <class T>
struct accumulator {
  using type = float;
};
template <>
struct accumulator<double> {
  using type = double;
};
template <class T>
struct accumulator<const T> : accumulator<T> {};
template <class T>
using accumulator_t = typename accumulator<T>::type;

}  // namespace kto
