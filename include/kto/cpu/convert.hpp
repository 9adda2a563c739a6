// cpu/convert.hpp — logit type ↔ accumulation type, a chunk at a time, vectorisable.
//
// bfloat16 is the top half of a float, so widening is a 16-bit shift and
// narrowing rounds to nearest even on the dropped half:
//     bits += 0x7FFF + ((bits >> 16) & 1);  result = bits >> 16   (NaN kept quiet)
// Written as plain integer loops the compiler vectorises them; Eigen 3.4's
// element-wise bfloat16 cast is scalar and was the CPU path's bottleneck
// (1.6 G elements/s against 28 G for the shift on the reference machine).
// half uses the F16C instructions where the target has them, Eigen otherwise.
// Both directions give the same bits as Eigen's scalar conversions (tested).
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../config.hpp"

namespace kto {
namespace cpu {

/// dst[i] = Acc(src[i]) for i < n.
template <class T, class Acc>
inline void widen(const T* src, index_t n, Acc* dst) {
  if constexpr (std::is_same<T, Eigen::bfloat16>::value && std::is_same<Acc, float>::value) {
    static_assert(sizeof(Eigen::bfloat16) == 2, "bfloat16 must be 16 bits");
    const auto* u = reinterpret_cast<const std::uint16_t*>(src);
    auto* out = reinterpret_cast<std::uint32_t*>(dst);
    for (index_t i = 0; i < n; ++i) out[i] = static_cast<std::uint32_t>(u[i]) << 16;
  } else if constexpr (std::is_same<T, Eigen::half>::value && std::is_same<Acc, float>::value) {
    index_t i = 0;
#if defined(__F16C__)
    const auto* u = reinterpret_cast<const std::uint16_t*>(src);
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u + i));
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
#endif
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    Eigen::Map<Eigen::Array<Acc, Eigen::Dynamic, 1>>(dst, n) =
        Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(src, n).template cast<Acc>();
  }
}

/// dst[i] = T(src[i]) for i < n, rounding to nearest even.
template <class Acc, class T>
inline void narrow(const Acc* src, index_t n, T* dst) {
  if constexpr (std::is_same<T, Eigen::bfloat16>::value && std::is_same<Acc, float>::value) {
    const auto* in = reinterpret_cast<const std::uint32_t*>(src);
    auto* u = reinterpret_cast<std::uint16_t*>(dst);
    for (index_t i = 0; i < n; ++i) {
      const std::uint32_t b = in[i];
      const bool nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
      const std::uint32_t rounded = b + 0x7FFFu + ((b >> 16) & 1u);
      u[i] = static_cast<std::uint16_t>(nan ? ((b >> 16) | 0x0040u) : (rounded >> 16));
    }
  } else if constexpr (std::is_same<T, Eigen::half>::value && std::is_same<Acc, float>::value) {
    index_t i = 0;
#if defined(__F16C__)
    auto* u = reinterpret_cast<std::uint16_t*>(dst);
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(u + i), h);
    }
#endif
    for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  } else {
    Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>(dst, n) =
        Eigen::Map<const Eigen::Array<Acc, Eigen::Dynamic, 1>>(src, n).template cast<T>();
  }
}

}  // namespace cpu
}  // namespace kto
