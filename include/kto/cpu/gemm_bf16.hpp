// cpu/gemm_bf16.hpp — C = A·B with bfloat16 inputs and fp32 accumulation (AVX512-BF16).
//
// VDPBF16PS (_mm512_dpbf16_ps) treats each 32-bit lane of its operands as a pair
// of bfloat16 and adds both products to an fp32 accumulator: one instruction is
// 16 lanes × 2 multiply-adds. So both operands are packed as pairs:
//
//   A panel (MR rows):   for each pair p, MR lanes  [A(i, 2p) | A(i, 2p+1)]
//   B panel (NR cols):   for each pair p, NR lanes  [B(2p, j) | B(2p+1, j)]
//
// and the micro-kernel keeps an MR × NR tile of C in zmm registers: per pair it
// loads NR/16 vectors of B, broadcasts each row's A pair to all lanes and issues
// MR · NR/16 dpbf16 (here 8 × 48: 24 accumulators). Goto/BLIS blocking around
// it: a KC-pair slice of B packed at a time, MC rows of A per slice, and the
// source of the next block prefetched while the kernels run, so packing seldom
// waits on DRAM. An odd k pads with zeros. Per thread the packed panels take
// ≤ 1.3 MiB of thread_local scratch, kept for the life of the thread that
// calls (the fused step's worker threads live for one parallel region).
//
// fp32 A (the gradients) would lose 16 mantissa bits if rounded to bfloat16, so
// each element is split a = hi + lo (hi = bf16(a), lo = bf16(a − hi)); the pair
// of ONE k becomes [hi | lo] against B's [b | b] (the second b made 0 when it is
// inf or NaN, so that a·inf stays ±inf where lo = 0). The split is only a packing
// choice: same kernel, twice the pairs, and A keeps ~16 bits (|a−hi−lo| ≤ 2⁻¹⁷|a|).
//
// The kernel is compiled for AVX512-BF16 through a function attribute, so it
// builds without -march=native; bf16_gemm_supported() asks CPUID (and the OS's
// XSAVE state) once. Elsewhere gemm_bf16 runs a portable scalar loop with the
// same pair arithmetic (also with -DKTO_NO_AVX512_BF16). VDPBF16PS flushes
// denormal inputs and results to zero.
// The result does not depend on the buffers' alignment: every call packs, and
// each C element is one sequential fp32 sum in k order whatever the blocking.
// One file of ~600 lines on purpose: the packing, the micro-kernel and the
// blocking share one panel layout, which reads best in one place.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"

#if !defined(KTO_NO_AVX512_BF16) && (defined(__GNUC__) || defined(__clang__)) && \
    defined(__x86_64__) && !defined(__CUDACC__) &&                               \
    ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10))
#define KTO_GEMM_BF16_X86 1
#include <cpuid.h>
#include <immintrin.h>
#define KTO_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define KTO_BF16_INLINE KTO_BF16_TARGET __attribute__((always_inline)) inline
#else
#define KTO_GEMM_BF16_X86 0
#endif

namespace kto {
namespace cpu {

/// Element (i, p) of a rows×cols matrix is data[i * row_stride + p * col_stride]
/// (strides in elements; either may be 1).
template <class T>
struct GemmOperand {
  const T* data;
  index_t row_stride;
  index_t col_stride;
};

namespace detail {

using Bf16Operand = GemmOperand<Eigen::bfloat16>;
using FloatOperand = GemmOperand<float>;

inline std::uint16_t bf16_bits(const Eigen::bfloat16* p) {
  std::uint16_t u;
  std::memcpy(&u, p, sizeof u);
  return u;
}
inline float bf16_value(std::uint32_t bits16) {
  const std::uint32_t b = bits16 << 16;
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
inline std::uint32_t float_bits(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}
/// bfloat16 bits of f, rounded to nearest even (NaN kept, made quiet).
inline std::uint32_t bf16_round(float f) {
  const std::uint32_t b = float_bits(f);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return (b >> 16) | 0x0040u;
  return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
}
/// The pair lane of a float A element: low half hi = bf16(a), high half lo = bf16(a − hi).
/// |a − hi − lo| ≤ 2⁻¹⁷|a|. A finite a that rounds to ±inf (|a| within 0.4% of FLT_MAX)
/// keeps hi truncated instead, so hi + lo stays finite (≤ 2⁻¹⁶|a| there); an infinite a
/// gets lo = 0 (not inf − inf).
inline std::uint32_t split_lane(float a) {
  const std::uint32_t bits = float_bits(a);
  const bool finite = (bits & 0x7FFFFFFFu) < 0x7F800000u;
  std::uint32_t hi = bf16_round(a);
  if (finite && (hi & 0x7FFFu) == 0x7F80u) hi = bits >> 16;
  const std::uint32_t lo =
      finite || (bits & 0x7FFFFFFFu) > 0x7F800000u ? bf16_round(a - bf16_value(hi)) : 0u;
  return hi | (lo << 16);
}

/// Pair lane p of row i of A: k = 2p, 2p+1 for bfloat16 A, k = p split for float A.
inline std::uint32_t a_lane(const Bf16Operand& a, index_t k, index_t i, index_t p) {
  const Eigen::bfloat16* e = a.data + i * a.row_stride + 2 * p * a.col_stride;
  const std::uint32_t lo = bf16_bits(e);
  const std::uint32_t hi = 2 * p + 1 < k ? bf16_bits(e + a.col_stride) : 0u;
  return lo | (hi << 16);
}
inline std::uint32_t a_lane(const FloatOperand& a, index_t, index_t i, index_t p) {
  return split_lane(a.data[i * a.row_stride + p * a.col_stride]);
}
/// The matching lane of column j of B: [B(2p, j) | B(2p+1, j)], or [B(p, j) | B(p, j)] (split).
/// In the split lane, lo meets a copy of b with inf/NaN made 0: hi·b + lo·0 keeps
/// a·inf = ±inf where lo = 0 (and NaN still comes through hi·b).
template <bool Split>
inline std::uint32_t b_lane(const Bf16Operand& b, index_t k, index_t p, index_t j) {
  if (Split) {
    const std::uint32_t v = bf16_bits(b.data + p * b.row_stride + j * b.col_stride);
    return v | ((v & 0x7F80u) == 0x7F80u ? 0u : v << 16);
  }
  const Eigen::bfloat16* e = b.data + 2 * p * b.row_stride + j * b.col_stride;
  const std::uint32_t lo = bf16_bits(e);
  const std::uint32_t hi = 2 * p + 1 < k ? bf16_bits(e + b.row_stride) : 0u;
  return lo | (hi << 16);
}

inline void clear_or_keep(index_t m, index_t n, float* c, index_t ldc, bool accumulate) {
  if (accumulate) return;
  for (index_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.f);
}

/// The portable path: the kernel's arithmetic lane by lane — per pair, the high
/// product is added first, then the low one (VDPBF16PS's documented order).
template <class TA>
void gemm_bf16_scalar_impl(index_t m, index_t n, index_t k, GemmOperand<TA> a, Bf16Operand b,
                           float* c, index_t ldc, bool accumulate) {
  constexpr bool split = std::is_same<TA, float>::value;
  const index_t pairs = split ? k : (k + 1) / 2;
  std::vector<std::uint32_t> row(static_cast<size_t>(pairs));
  for (index_t i = 0; i < m; ++i) {
    for (index_t p = 0; p < pairs; ++p) row[static_cast<size_t>(p)] = a_lane(a, k, i, p);
    for (index_t j = 0; j < n; ++j) {
      float acc = accumulate ? c[i * ldc + j] : 0.f;
      for (index_t p = 0; p < pairs; ++p) {
        const std::uint32_t x = row[static_cast<size_t>(p)];
        const std::uint32_t y = b_lane<split>(b, k, p, j);
        acc += bf16_value(x >> 16) * bf16_value(y >> 16);
        acc += bf16_value(x & 0xFFFFu) * bf16_value(y & 0xFFFFu);
      }
      c[i * ldc + j] = acc;
    }
  }
}

inline void gemm_bf16_scalar(index_t m, index_t n, index_t k, Bf16Operand a, Bf16Operand b,
                             float* c, index_t ldc, bool accumulate) {
  gemm_bf16_scalar_impl(m, n, k, a, b, c, ldc, accumulate);
}
inline void gemm_bf16_scalar(index_t m, index_t n, index_t k, FloatOperand a, Bf16Operand b,
                             float* c, index_t ldc, bool accumulate) {
  gemm_bf16_scalar_impl(m, n, k, a, b, c, ldc, accumulate);
}

inline bool detect_avx512_bf16() {
#if KTO_GEMM_BF16_X86
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return false;  // OSXSAVE
  unsigned xcr0 = 0, xcr0_high = 0;
  __asm__("xgetbv" : "=a"(xcr0), "=d"(xcr0_high) : "c"(0u));
  (void)xcr0_high;
  if ((xcr0 & 0xE6u) != 0xE6u) return false;  // the OS saves SSE, AVX, opmask and zmm state
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool f = (ebx >> 16) & 1u, bw = (ebx >> 30) & 1u, vl = (ebx >> 31) & 1u;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
  return f && bw && vl && ((eax >> 5) & 1u);
#else
  return false;
#endif
}

#if KTO_GEMM_BF16_X86
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports its own AVX-512 intrinsics (`__m512i __Y = __Y;`) as maybe uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

// Blocking for Zen 4 (32 KiB L1d, 1 MiB L2 per core); k is counted in pairs.
constexpr int kMR = 8;         ///< rows of the register tile
constexpr int kNV = 3;         ///< zmm vectors across the tile: NR = 48 columns
constexpr int kNR = 16 * kNV;  ///< columns of the register tile
constexpr index_t kKC = 192;   ///< pairs of a packed slice: a B panel is 36 KiB
constexpr index_t kMC = 192;   ///< rows of A packed at once (144 KiB)
constexpr index_t kNC = 1536;  ///< columns of B packed at once (1.1 MiB)

/// Touches the source of the next packed block one cache line at a time from
/// inside the kernel loop, so that packing reads it from L2 instead of waiting
/// on DRAM (a burst of prefetches would stall the kernel on the full miss
/// queue instead). The block is `count` byte ranges, `stride` apart.
struct Prefetcher {
  const char* base = nullptr;
  index_t count = 0, stride = 0, bytes = 0, per_tile = 0, budget = 0;
  index_t range = 0, offset = 0;

  /// Rows [r0, r0 + rows) × columns [c0, c0 + cols) of x, spread over `tiles` kernel calls.
  template <class T>
  void start(const GemmOperand<T>& x, index_t r0, index_t rows, index_t c0, index_t cols,
             index_t tiles) {
    range = offset = count = budget = 0;
    if (rows <= 0 || cols <= 0) return;
    base = reinterpret_cast<const char*>(x.data + r0 * x.row_stride + c0 * x.col_stride);
    if (x.col_stride == 1) {
      count = rows, stride = x.row_stride, bytes = cols;
    } else if (x.row_stride == 1) {
      count = cols, stride = x.col_stride, bytes = rows;
    } else {
      return;  // scattered elements: left to the hardware
    }
    stride *= static_cast<index_t>(sizeof(T));
    bytes *= static_cast<index_t>(sizeof(T));
    const index_t lines = count * ((bytes + 63) / 64 + 1);
    per_tile = (lines + tiles - 1) / std::max<index_t>(tiles, 1);
  }
  void stop() { count = budget = 0; }
  /// Before each kernel call: its share of the lines.
  void grant() { budget += per_tile; }
  /// One line of the share (a range's last line: through its last byte).
  void line() {
    if (budget <= 0 || range >= count) return;
    __builtin_prefetch(base + range * stride + std::min(offset, bytes - 1), 0, 2);
    --budget;
    offset += 64;
    if (offset >= bytes + 63) offset = 0, ++range;
  }
};

/// C[R × cols] (+)= A panel · B panel over kp pairs; 16(NV−1) < cols ≤ 16 NV.
template <int R, int NV>
KTO_BF16_TARGET void bf16_tile(index_t kp, const std::uint32_t* a, const std::uint32_t* b, float* c,
                               index_t ldc, int cols, bool load_c, Prefetcher* next) {
  __m512 acc[R][NV];
  const int last = cols - 16 * (NV - 1);
  const __mmask16 tail = static_cast<__mmask16>(last >= 16 ? 0xFFFFu : (1u << last) - 1u);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mask = v == NV - 1 ? tail : static_cast<__mmask16>(0xFFFFu);
      acc[r][v] = load_c ? _mm512_maskz_loadu_ps(mask, c + r * ldc + 16 * v) : _mm512_setzero_ps();
    }
  }
  for (index_t p = 0; p < kp; ++p) {
    next[0].line();
    next[1].line();
    __m512i bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_si512(b + (p * NV + v) * 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(a[p * R + r]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)bv[v], (__m512bh)av);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mask = v == NV - 1 ? tail : static_cast<__mmask16>(0xFFFFu);
      _mm512_mask_storeu_ps(c + r * ldc + 16 * v, mask, acc[r][v]);
    }
  }
}

using TileFn = void (*)(index_t, const std::uint32_t*, const std::uint32_t*, float*, index_t, int,
                        bool, Prefetcher*);

template <int R, std::size_t... V>
constexpr std::array<TileFn, kNV> tile_row(std::index_sequence<V...>) {
  return {{&bf16_tile<R, static_cast<int>(V) + 1>...}};
}
template <std::size_t... R>
constexpr std::array<std::array<TileFn, kNV>, kMR> tile_table(std::index_sequence<R...>) {
  return {{tile_row<static_cast<int>(R) + 1>(std::make_index_sequence<kNV>{})...}};
}
/// The kernel for a tile of 1..kMR rows and 1..kNV vectors of columns.
inline TileFn tile_for(int rows, int vectors) {
  static constexpr auto table = tile_table(std::make_index_sequence<kMR>{});
  return table[static_cast<size_t>(rows - 1)][static_cast<size_t>(vectors - 1)];
}

/// 16 split lanes [hi | lo] of 16 floats (split_lane, vectorised).
KTO_BF16_INLINE __m512i split16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
  const __m512i inf = _mm512_set1_epi32(0x7F800000);
  const __mmask16 finite = _mm512_cmplt_epu32_mask(magnitude, inf);
  const __mmask16 infinite = _mm512_cmpeq_epi32_mask(magnitude, inf);
  __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x));
  const __mmask16 overflow = _mm512_mask_cmpeq_epi32_mask(
      finite, _mm512_and_si512(hi, _mm512_set1_epi32(0x7FFF)), _mm512_set1_epi32(0x7F80));
  hi = _mm512_mask_mov_epi32(hi, overflow, _mm512_srli_epi32(bits, 16));
  const __m512 rest = _mm512_sub_ps(x, _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)));
  const __m512i lo = _mm512_maskz_cvtepu16_epi32(static_cast<__mmask16>(~infinite),
                                                 (__m256i)_mm512_cvtneps_pbh(rest));
  return _mm512_or_si512(hi, _mm512_slli_epi32(lo, 16));
}

/// 16 bf16 (one per 32-bit lane), inf and NaN made 0 (b_lane's split partner).
KTO_BF16_INLINE __m512i finite_or_zero(__m512i x) {
  const __m512i exponent = _mm512_set1_epi32(0x7F80);
  return _mm512_maskz_mov_epi32(_mm512_cmpneq_epi32_mask(_mm512_and_si512(x, exponent), exponent),
                                x);
}

/// dst[q·ld + r] = lane q of x[r] for r < 8, q < 16: an 8 × 16 transpose of lanes.
KTO_BF16_INLINE void store_transposed(const __m512i* x, std::uint32_t* dst, index_t ld) {
  __m512i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm512_unpacklo_epi32(x[i], x[i + 1]);  // per 128-bit block L: x[i], x[i+1] at 4L, 4L+1
    t[i + 1] = _mm512_unpackhi_epi32(x[i], x[i + 1]);  // ... at 4L+2, 4L+3
  }
  for (int h = 0; h < 8; h += 4) {  // u[h + j], block L: rows h..h+3 of lane q = 4L + j
    u[h] = _mm512_unpacklo_epi64(t[h], t[h + 2]);
    u[h + 1] = _mm512_unpackhi_epi64(t[h], t[h + 2]);
    u[h + 2] = _mm512_unpacklo_epi64(t[h + 1], t[h + 3]);
    u[h + 3] = _mm512_unpackhi_epi64(t[h + 1], t[h + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    // Blocks [u_j.0, u_{4+j}.0, u_j.1, u_{4+j}.1]: all 8 rows of lanes j, 4 + j; then 8 + j, 12 +
    // j.
    const __m512i lo = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44);
    const __m512i hi = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
    const __m512i a = _mm512_shuffle_i32x4(lo, lo, 0xD8), b = _mm512_shuffle_i32x4(hi, hi, 0xD8);
    _mm256_storeu_si256((__m256i*)(dst + j * ld), _mm512_castsi512_si256(a));
    _mm256_storeu_si256((__m256i*)(dst + (4 + j) * ld), _mm512_extracti64x4_epi64(a, 1));
    _mm256_storeu_si256((__m256i*)(dst + (8 + j) * ld), _mm512_castsi512_si256(b));
    _mm256_storeu_si256((__m256i*)(dst + (12 + j) * ld), _mm512_extracti64x4_epi64(b, 1));
  }
}

/// Packs rows [i0, i0 + mc) × pairs [p0, p0 + kp) of A as panels of kMR rows,
/// panel q at dst + q·kMR·kp holding [pair][row] (its actual rows wide).
template <class TA>
KTO_BF16_TARGET void pack_a(const GemmOperand<TA>& a, index_t k, index_t i0, index_t mc, index_t p0,
                            index_t kp, std::uint32_t* dst) {
  constexpr bool split = std::is_same<TA, float>::value;
  for (index_t ir = 0; ir < mc; ir += kMR) {
    const index_t mr = std::min<index_t>(kMR, mc - ir);
    std::uint32_t* panel = dst + ir * kp;
    const index_t i = i0 + ir;
    if constexpr (split) {
      if (a.row_stride == 1) {  // a column of the panel is contiguous
        const auto mask = static_cast<__mmask16>((1u << mr) - 1u);
        for (index_t p = 0; p < kp; ++p) {
          const float* src = a.data + i + (p0 + p) * a.col_stride;
          _mm512_mask_storeu_epi32(panel + p * mr, mask, split16(_mm512_maskz_loadu_ps(mask, src)));
        }
        continue;
      }
      if (a.col_stride == 1) {  // a row is contiguous: split 16 of each row, transpose
        index_t p = 0;
        if (mr == kMR) {
          for (; p + 16 <= kp; p += 16) {
            __m512i x[kMR];
            for (int r = 0; r < kMR; ++r)
              x[r] = split16(_mm512_loadu_ps(a.data + (i + r) * a.row_stride + p0 + p));
            store_transposed(x, panel + p * kMR, kMR);
          }
        }
        for (; p < kp; ++p)
          for (index_t r = 0; r < mr; ++r) panel[p * mr + r] = a_lane(a, k, i + r, p0 + p);
        continue;
      }
    } else {
      if (a.row_stride == 1) {  // two contiguous columns make a pair
        for (index_t p = 0; p < kp; ++p) {
          const index_t kk = 2 * (p0 + p);
          const auto* lo = reinterpret_cast<const std::uint16_t*>(a.data + i + kk * a.col_stride);
          const std::uint16_t* hi = kk + 1 < k ? lo + a.col_stride : nullptr;
          for (index_t r = 0; r < mr; ++r)
            panel[p * mr + r] = lo[r] | (hi ? static_cast<std::uint32_t>(hi[r]) << 16 : 0u);
        }
        continue;
      }
      if (a.col_stride == 1 && mr == kMR) {  // rows contiguous: 16 pairs a row, transposed
        const index_t whole = std::min(kp, k / 2 - p0) / 16 * 16;  // 16 pairs inside k
        index_t p = 0;
        for (; p < whole; p += 16) {
          __m512i x[kMR];
          for (int r = 0; r < kMR; ++r)
            x[r] = _mm512_loadu_si512(a.data + (i + r) * a.row_stride + 2 * (p0 + p));
          store_transposed(x, panel + p * kMR, kMR);
        }
        for (std::uint32_t* out = panel + p * kMR; p < kp; ++p, out += kMR)
          for (int r = 0; r < kMR; ++r) out[r] = a_lane(a, k, i + r, p0 + p);
        continue;
      }
    }
    for (index_t r = 0; r < mr; ++r)
      for (index_t p = 0; p < kp; ++p) panel[p * mr + r] = a_lane(a, k, i + r, p0 + p);
  }
}

/// Lanes from one packed B panel to the next: one cache line more than a panel
/// holds, so that the panels written side by side (row-wise packing) do not all
/// map to the same L1 sets (kp·kNR·4 bytes is a multiple of 4 KiB for many kp).
constexpr index_t b_panel_stride(index_t kp) {
  return kp * kNR + 16;
}

/// Packs pairs [p0, p0 + kp) × columns [j0, j0 + nc) of B as panels of kNR
/// columns, panel q at dst + q·b_panel_stride(kp) holding [pair][column], its
/// width rounded up to 16 with zero columns.
template <bool Split>
KTO_BF16_TARGET void pack_b(const Bf16Operand& b, index_t k, index_t j0, index_t nc, index_t p0,
                            index_t kp, std::uint32_t* dst) {
  if (b.col_stride == 1) {  // rows of B contiguous: read each row once, in order
    static const std::uint16_t zeros[kNC] = {};  // the row after an odd k's last
    const auto* base = reinterpret_cast<const std::uint16_t*>(b.data) + j0;
    const index_t stride = b_panel_stride(kp), full = nc / kNR, rest = nc - full * kNR;
    for (index_t p = 0; p < kp; ++p) {
      const index_t k0 = Split ? p0 + p : 2 * (p0 + p);
      const std::uint16_t* lo = base + k0 * b.row_stride;
      const std::uint16_t* hi = Split ? lo : k0 + 1 < k ? lo + b.row_stride : zeros;
      std::uint32_t* out = dst + p * kNR;
      for (index_t q = 0; q < full; ++q, lo += kNR, hi += kNR, out += stride) {
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) {
          const __m512i x =
              _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(lo + 16 * v)));
          const __m512i y =
              Split ? finite_or_zero(x)
                    : _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(hi + 16 * v)));
          _mm512_store_si512(out + 16 * v, _mm512_or_si512(x, _mm512_slli_epi32(y, 16)));
        }
      }
      if (rest == 0) continue;
      const index_t width = (rest + 15) / 16 * 16;
      out = dst + full * stride + p * width;
      for (index_t v = 0; v < width; v += 16) {
        const index_t left = rest - v;
        const auto mask = static_cast<__mmask16>(left >= 16 ? 0xFFFFu : (1u << left) - 1u);
        const __m512i x = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, lo + v));
        const __m512i y = Split ? finite_or_zero(x)
                                : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, hi + v));
        _mm512_store_si512(out + v, _mm512_or_si512(x, _mm512_slli_epi32(y, 16)));
      }
    }
    return;
  }
  for (index_t jr = 0; jr < nc; jr += kNR) {
    const index_t nr = std::min<index_t>(kNR, nc - jr);
    const index_t width = (nr + 15) / 16 * 16;
    std::uint32_t* panel = dst + jr / kNR * b_panel_stride(kp);
    index_t jj = 0;
    if (b.row_stride == 1) {  // columns contiguous in k: 16 pairs of 8 columns, transposed
      // Pairs [p0, p0 + full) lie wholly inside k.
      const index_t full = std::min(kp, Split ? k - p0 : k / 2 - p0);
      for (; jj + 8 <= nr; jj += 8) {
        const Eigen::bfloat16* column = b.data + (j0 + jr + jj) * b.col_stride;
        index_t p = 0;
        for (; p + 16 <= full; p += 16) {
          __m512i x[8];
          for (int r = 0; r < 8; ++r) {
            const Eigen::bfloat16* e = column + r * b.col_stride;
            if (Split) {
              const __m512i v =
                  _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(e + p0 + p)));
              x[r] = _mm512_or_si512(v, _mm512_slli_epi32(finite_or_zero(v), 16));
            } else {
              x[r] = _mm512_loadu_si512(e + 2 * (p0 + p));
            }
          }
          store_transposed(x, panel + p * width + jj, width);
        }
        for (; p < kp; ++p)
          for (index_t q = 0; q < 8; ++q)
            panel[p * width + jj + q] = b_lane<Split>(b, k, p0 + p, j0 + jr + jj + q);
      }
    }
    for (; jj < nr; ++jj)
      for (index_t p = 0; p < kp; ++p)
        panel[p * width + jj] = b_lane<Split>(b, k, p0 + p, j0 + jr + jj);
    for (index_t p = 0; p < kp; ++p) std::fill(panel + p * width + nr, panel + (p + 1) * width, 0u);
  }
}

/// 64-byte aligned scratch of at least n lanes, one per thread, kept while the thread lives.
inline std::uint32_t* scratch(std::vector<std::uint32_t>& buffer, index_t n) {
  const auto need = static_cast<size_t>(n) + 16;
  if (buffer.size() < need) buffer.resize(need);
  const auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
  return buffer.data() + ((64 - address % 64) % 64) / sizeof(std::uint32_t);
}

/// Elements of k that pairs [p0, p0 + kp) cover.
inline index_t k_begin(bool split, index_t p0) {
  return split ? p0 : 2 * p0;
}
inline index_t k_count(bool split, index_t k, index_t p0, index_t kp) {
  return split ? kp : std::min(k, 2 * (p0 + kp)) - 2 * p0;
}

template <class TA>
KTO_BF16_TARGET void gemm_bf16_avx512(index_t m, index_t n, index_t k, GemmOperand<TA> a,
                                      Bf16Operand b, float* c, index_t ldc, bool accumulate) {
  constexpr bool split = std::is_same<TA, float>::value;
  if (m <= 0 || n <= 0) return;
  if (k <= 0) return clear_or_keep(m, n, c, ldc, accumulate);
  const index_t pairs = split ? k : (k + 1) / 2;
  thread_local std::vector<std::uint32_t> a_buffer, b_buffer;
  const index_t kc_max = std::min(kKC, pairs);
  std::uint32_t* bp =
      scratch(b_buffer, b_panel_stride(kc_max) * ((std::min(kNC, n) + kNR - 1) / kNR));
  std::uint32_t* ap = scratch(a_buffer, kc_max * std::min(kMC, m));
  Prefetcher next[2];  // the next slice of B, the next block of A
  Prefetcher &next_b = next[0], &next_a = next[1];
  for (index_t jc = 0; jc < n; jc += kNC) {
    const index_t nc = std::min(kNC, n - jc);
    const index_t panels = (nc + kNR - 1) / kNR;
    for (index_t pc = 0; pc < pairs; pc += kKC) {
      const index_t kp = std::min(kKC, pairs - pc);
      pack_b<split>(b, k, jc, nc, pc, kp, bp);
      {  // the next slice of B: same columns and the next pairs, or the next columns
        const index_t tiles = panels * ((m + kMR - 1) / kMR);
        if (pc + kp < pairs) {
          const index_t next = std::min(kKC, pairs - pc - kp);
          next_b.start(b, k_begin(split, pc + kp), k_count(split, k, pc + kp, next), jc, nc, tiles);
        } else {
          next_b.start(b, 0, k_count(split, k, 0, kc_max), jc + nc, std::min(kNC, n - jc - nc),
                       tiles);
        }
      }
      const bool load_c = accumulate || pc > 0;
      for (index_t ic = 0; ic < m; ic += kMC) {
        const index_t mc = std::min(kMC, m - ic);
        pack_a(a, k, ic, mc, pc, kp, ap);
        const index_t tiles = panels * ((mc + kMR - 1) / kMR);
        if (ic + mc < m) {
          next_a.start(a, ic + mc, std::min(kMC, m - ic - mc), k_begin(split, pc),
                       k_count(split, k, pc, kp), tiles);
        } else if (pc + kp < pairs) {
          const index_t next = std::min(kKC, pairs - pc - kp);
          next_a.start(a, 0, std::min(kMC, m), k_begin(split, pc + kp),
                       k_count(split, k, pc + kp, next), tiles);
        } else {
          next_a.stop();
        }
        for (index_t jr = 0; jr < nc; jr += kNR) {
          const auto nr = static_cast<int>(std::min<index_t>(kNR, nc - jr));
          const std::uint32_t* b_panel = bp + jr / kNR * b_panel_stride(kp);
          for (index_t ir = 0; ir < mc; ir += kMR) {
            next_b.grant();
            next_a.grant();
            const auto mr = static_cast<int>(std::min<index_t>(kMR, mc - ir));
            tile_for(mr, (nr + 15) / 16)(kp, ap + ir * kp, b_panel, c + (ic + ir) * ldc + jc + jr,
                                         ldc, nr, load_c, next);
          }
        }
      }
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // KTO_GEMM_BF16_X86

}  // namespace detail

/// True when this CPU runs the AVX512-BF16 kernel (runtime check, cached) and the
/// compiler could build it.
inline bool bf16_gemm_supported() {
  static const bool supported = detail::detect_avx512_bf16();
  return supported;
}

/// C[m×n] (row-major, fp32, leading dimension ldc) = (accumulate ? C : 0) + A[m×k] · B[k×n],
/// fp32 accumulation. A is bfloat16 (exact products), or float: then each element is split
/// a = hi + lo (hi = bf16 round-to-nearest-even of a, lo = bf16 of a - hi) and both halves are
/// multiplied, so A keeps ~16 mantissa bits (relative error ~2^-17 instead of bf16's 2^-9).
/// B is bfloat16. Single-threaded: callers split n (or m) across threads themselves.
/// Precondition: bf16_gemm_supported(); m, n, k >= 0.
inline void gemm_bf16(index_t m, index_t n, index_t k, GemmOperand<Eigen::bfloat16> a,
                      GemmOperand<Eigen::bfloat16> b, float* c, index_t ldc, bool accumulate) {
#if KTO_GEMM_BF16_X86
  if (bf16_gemm_supported()) return detail::gemm_bf16_avx512(m, n, k, a, b, c, ldc, accumulate);
#endif
  detail::gemm_bf16_scalar(m, n, k, a, b, c, ldc, accumulate);
}
inline void gemm_bf16(index_t m, index_t n, index_t k, GemmOperand<float> a,
                      GemmOperand<Eigen::bfloat16> b, float* c, index_t ldc, bool accumulate) {
#if KTO_GEMM_BF16_X86
  if (bf16_gemm_supported()) return detail::gemm_bf16_avx512(m, n, k, a, b, c, ldc, accumulate);
#endif
  detail::gemm_bf16_scalar(m, n, k, a, b, c, ldc, accumulate);
}

}  // namespace cpu
}  // namespace kto
