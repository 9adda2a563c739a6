// numeric.cuh — logit types on the device: widening to fp32 and 16-byte vectors.
//
// Logits are float, __half or __nv_bfloat16; every kernel accumulates in fp32.
// Rows are read and written as 16-byte vectors (4 floats or 8 halves) where
// the row pointer is 16-byte aligned: a row of a [B, T, V] tensor usually is,
// a shifted or padded view may not be, and then the row's first few elements
// are handled one by one until the address is aligned (see row_span()).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <kto/config.hpp>

namespace kto {
namespace device {

template <class T>
struct is_logit_type : std::integral_constant<bool, std::is_same<T, float>::value ||
                                                        std::is_same<T, __half>::value ||
                                                        std::is_same<T, __nv_bfloat16>::value> {};

// Host-and-device where they can be, so tests can run the index and
// reduction logic of the kernels on a CPU (tests/cpp/cuda/test_device_logic.cu).
KTO_HOST_DEVICE inline float to_float(float x) {
  return x;
}
KTO_HOST_DEVICE inline float to_float(__half x) {
  return __half2float(x);
}
KTO_HOST_DEVICE inline float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <class T>
KTO_HOST_DEVICE inline T from_float(float x);
template <>
KTO_HOST_DEVICE inline float from_float<float>(float x) {
  return x;
}
template <>
KTO_HOST_DEVICE inline __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
KTO_HOST_DEVICE inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

/// 16 bytes of logits.
template <class T>
struct alignas(16) Vec {
  static constexpr int kWidth = 16 / sizeof(T);
  T v[kWidth];
};

/// A read-only 16-byte load through the non-coherent cache (forward only:
/// the backward may write the same row in place and uses plain loads).
template <class T>
KTO_HOST_DEVICE inline Vec<T> load_vector(const Vec<T>* p) {
  static_assert(sizeof(Vec<T>) == sizeof(int4), "a vector is 16 bytes");
  Vec<T> v;
#if defined(__CUDA_ARCH__)
  const int4 raw = __ldg(reinterpret_cast<const int4*>(p));
  memcpy(&v, &raw, sizeof(v));
#else
  memcpy(&v, p, sizeof(v));
#endif
  return v;
}

/// A 16-byte store with the evict-first hint (the gradient is not re-read).
template <class T>
KTO_HOST_DEVICE inline void store_streaming(Vec<T>* p, const Vec<T>& v) {
#if defined(__CUDA_ARCH__)
  int4 raw;
  memcpy(&raw, &v, sizeof(raw));
  __stcs(reinterpret_cast<int4*>(p), raw);
#else
  memcpy(p, &v, sizeof(v));
#endif
}

/// How a row of `vocab` elements at `p` splits into a scalar head (until the
/// address is 16-byte aligned), whole 16-byte vectors, and a scalar tail.
struct RowSpan {
  index_t head;     ///< elements before the first aligned vector
  index_t vectors;  ///< number of 16-byte vectors after the head
  index_t tail;     ///< first element of the scalar tail
};

template <class T>
KTO_HOST_DEVICE inline RowSpan row_span(const void* p, index_t vocab) {
  constexpr index_t w = Vec<T>::kWidth;
  const auto misalign = static_cast<index_t>(reinterpret_cast<std::uintptr_t>(p) % 16);
  index_t head = misalign == 0 ? 0 : (16 - misalign) / static_cast<index_t>(sizeof(T));
  head = head < vocab ? head : vocab;
  const index_t vectors = (vocab - head) / w;
  return RowSpan{head, vectors, head + vectors * w};
}

}  // namespace device
}  // namespace kto
