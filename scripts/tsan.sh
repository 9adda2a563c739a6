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

# The tree and its flags: the tsan presets of CMakePresets.json (build-tsan/).
extra=()
[ -n "${KTO_TSAN_CXX:-}" ] && extra+=(-DCMAKE_CXX_COMPILER="$KTO_TSAN_CXX")
cmake --preset tsan "${extra[@]}" >/dev/null
cmake --build --preset tsan -j"$jobs"

# The threaded tests run with several threads even on a 1-core machine (their
# thread counts are explicit), so TSan sees real concurrency everywhere.
# The test preset runs the tests labelled cpu (not package) with
# TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 $TSAN_OPTIONS".
filter=()
[ -n "${KTO_TSAN_REGEX:-}" ] && filter+=(-R "$KTO_TSAN_REGEX")
ctest --preset tsan -j"$jobs" "${filter[@]}"
