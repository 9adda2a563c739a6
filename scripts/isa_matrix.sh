#!/usr/bin/env bash
# The ISA stages of CI beyond the presets (release: -march=native; asan-ubsan:
# x86-64-v3, AVX2 + FMA; tsan: x86-64, SSE2), each with warnings as errors:
#
#   aarch64   the CPU tests cross-compiled with g++-aarch64-linux-gnu
#             (cmake/aarch64-linux-gnu.cmake) and run under qemu-aarch64-static;
#   x86-64-v4 the CPU tests for AVX-512, when -march=native does not already cover it:
#             compiled, and run where the CPU can (else each reports a skip naming
#             the missing feature: kto/cpu/isa.hpp, tests/cpp/catch_main.cpp).
#
#   KTO_ISA_JOBS   build and ctest jobs (default: nproc)
#   KTO_ISA_STAGES the stages to run (default: "aarch64 x86-64-v4")
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${KTO_ISA_JOBS:-$(nproc)}
stages=${KTO_ISA_STAGES:-aarch64 x86-64-v4}
common=(-DCMAKE_BUILD_TYPE=Release -DKTO_WARNINGS_AS_ERRORS=ON -DKTO_ENABLE_CUDA=OFF
        -DKTO_BUILD_BENCHMARKS=OFF -DKTO_BUILD_EXAMPLES=OFF)

for stage in $stages; do
  case "$stage" in
    aarch64)
      echo "== ISA aarch64 (armv8-a): cross-compiled, CPU tests under qemu-aarch64-static"
      cmake -S . -B build-aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
        -DKTO_MARCH=armv8-a "${common[@]}" >/dev/null
      cmake --build build-aarch64 -j"$jobs"
      # MPI is not cross-built (examples off); the install test is the build machine's.
      ctest --test-dir build-aarch64 -j"$jobs" -L cpu -LE package --output-on-failure
      ;;
    x86-64-v4)
      if [ "$(uname -m)" != x86_64 ]; then
        echo "== ISA x86-64-v4: not an x86-64 build machine, skipped"
        continue
      fi
      # The macros first, then grep: grep -q exiting early would fail the pipe (pipefail).
      native_macros=$(c++ -march=native -dM -E -x c++ /dev/null)
      if grep -q '__AVX512F__' <<<"$native_macros"; then
        echo "== ISA x86-64-v4: -march=native here includes AVX-512 (the release build ran it)"
        continue
      fi
      echo "== ISA x86-64-v4 (AVX-512): compiled; run where the CPU has it"
      cmake -S . -B build-x86-64-v4 -DKTO_MARCH=x86-64-v4 "${common[@]}" >/dev/null
      cmake --build build-x86-64-v4 -j"$jobs"
      ctest --test-dir build-x86-64-v4 -j"$jobs" -L cpu -LE 'package|docs' --output-on-failure
      ;;
    *)
      echo "isa_matrix: unknown stage '$stage' (aarch64, x86-64-v4)" >&2
      exit 2
      ;;
  esac
done
