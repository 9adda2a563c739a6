#!/usr/bin/env bash
# Builds the CPU tests under ThreadSanitizer and runs them: parallel_for
# (include/kto/cpu/parallel.hpp) and every threaded path of the CPU step, the
# fused-linear step and their thread-count determinism tests. Any data race
# fails the run (halt_on_error=1).
#
#   KTO_TSAN_JOBS    build and ctest jobs (default: nproc)
#   KTO_TSAN_REGEX   only the ctest tests matching this regex (default: all CPU tests)
#   KTO_TSAN_CXX     compiler (default: the system c++, g++ on Debian)
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${KTO_TSAN_JOBS:-$(nproc)}

tsan="-fsanitize=thread -fno-omit-frame-pointer"
# GCC 12 flags its own AVX-512 intrinsics (`__m512 __Y = __Y;`) under the sanitizers.
warn="-Wno-uninitialized"
extra=()
[ -n "${KTO_TSAN_CXX:-}" ] && extra+=(-DCMAKE_CXX_COMPILER="$KTO_TSAN_CXX")
cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
  -DKTO_BUILD_BENCHMARKS=OFF -DKTO_BUILD_EXAMPLES=OFF -DKTO_ENABLE_CUDA=OFF \
  -DCMAKE_CXX_FLAGS="$tsan $warn" -DCMAKE_EXE_LINKER_FLAGS="$tsan" "${extra[@]}" >/dev/null
cmake --build build-tsan -j"$jobs"

# The threaded tests run with several threads even on a 1-core machine (their
# thread counts are explicit), so TSan sees real concurrency everywhere.
filter=()
[ -n "${KTO_TSAN_REGEX:-}" ] && filter+=(-R "$KTO_TSAN_REGEX")
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ${TSAN_OPTIONS:-}" \
  ctest --test-dir build-tsan -j"$jobs" --output-on-failure -L cpu -LE package "${filter[@]}"
