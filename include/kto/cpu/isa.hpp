// cpu/isa.hpp — which x86-64 level the CPU code was compiled for, and which the CPU runs.
//
// Eigen picks its packet width at compile time (__AVX2__, __AVX512F__, ...), so the same
// kernels compiled with -march=x86-64 (SSE2), x86-64-v3 (AVX2 + FMA) or x86-64-v4
// (AVX-512) differ 1.3-3.6x in speed. The Python packages compile one copy per level and
// load the best one this CPU runs (runtime dispatch); the tests skip a binary built for a
// level the CPU lacks instead of dying of SIGILL. The checks are compiled for the
// baseline (target "arch=x86-64"), so they run on any x86-64 CPU.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define KTO_ISA_BASELINE __attribute__((target("arch=x86-64")))
#else
#define KTO_ISA_BASELINE
#endif

namespace kto {
namespace cpu {

/// The level this translation unit was compiled for: "x86-64", "x86-64-v2", "x86-64-v3",
/// "x86-64-v4" (x86-64), "aarch64", or "unknown".
inline const char* compiled_isa() {
#if defined(__x86_64__)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__AVX512CD__)
  return "x86-64-v4";
#elif defined(__AVX2__) && defined(__FMA__) && defined(__BMI2__) && defined(__F16C__)
  return "x86-64-v3";
#elif defined(__SSE4_2__) && defined(__POPCNT__)
  return "x86-64-v2";
#else
  return "x86-64";
#endif
#elif defined(__aarch64__)
  return "aarch64";
#else
  return "unknown";
#endif
}

/// The first extension this translation unit was compiled for that the CPU lacks, or
/// nullptr when the CPU runs it (always nullptr off x86-64).
KTO_ISA_BASELINE inline const char* missing_isa_feature() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
#define KTO_ISA_REQUIRE(name) \
  if (!__builtin_cpu_supports(name)) return name;
#ifdef __SSE4_2__
  KTO_ISA_REQUIRE("sse4.2")
#endif
#ifdef __POPCNT__
  KTO_ISA_REQUIRE("popcnt")
#endif
#ifdef __AVX__
  KTO_ISA_REQUIRE("avx")
#endif
#ifdef __AVX2__
  KTO_ISA_REQUIRE("avx2")
#endif
#ifdef __FMA__
  KTO_ISA_REQUIRE("fma")
#endif
#ifdef __BMI2__
  KTO_ISA_REQUIRE("bmi2")
#endif
#ifdef __AVX512F__
  KTO_ISA_REQUIRE("avx512f")
#endif
#ifdef __AVX512BW__
  KTO_ISA_REQUIRE("avx512bw")
#endif
#ifdef __AVX512DQ__
  KTO_ISA_REQUIRE("avx512dq")
#endif
#ifdef __AVX512VL__
  KTO_ISA_REQUIRE("avx512vl")
#endif
#ifdef __AVX512CD__
  KTO_ISA_REQUIRE("avx512cd")
#endif
#ifdef __AVX512BF16__
  KTO_ISA_REQUIRE("avx512bf16")
#endif
#undef KTO_ISA_REQUIRE
#endif
  return nullptr;
}

/// The highest x86-64 level this CPU runs (its features, and the OS saving their
/// registers: libgcc checks XCR0), "aarch64" on Arm, "unknown" elsewhere.
KTO_ISA_BASELINE inline const char* cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool v2 = __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("popcnt") &&
                  __builtin_cpu_supports("ssse3");
  const bool v3 = v2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("avx");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                  __builtin_cpu_supports("avx512cd");
  return v4 ? "x86-64-v4" : v3 ? "x86-64-v3" : v2 ? "x86-64-v2" : "x86-64";
#elif defined(__aarch64__)
  return "aarch64";
#else
  return "unknown";
#endif
}

}  // namespace cpu
}  // namespace kto
