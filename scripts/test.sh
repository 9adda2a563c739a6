#!/usr/bin/env bash
# The test command: install what is missing, check the format (scripts/lint.sh),
# build everything with warnings as errors, run every test, then rebuild the
# CPU tests under AddressSanitizer + UBSan and run them again, under
# ThreadSanitizer, and fuzz the CPU entry points (scripts/fuzz.sh). The build
# trees and their flags are the presets of CMakePresets.json.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
jobs=$(nproc)

echo "== lint (clang-format, ruff)"
scripts/lint.sh

echo "== build (Release, warnings as errors)"
cmake --preset release >/dev/null
# The CUDA targets first where nvcc was found (compiled, not run: no GPU here).
cache=build/CMakeCache.txt
if grep -q '^KTO_ENABLE_CUDA:BOOL=ON' "$cache" && grep -q '^CMAKE_CUDA_COMPILER:[A-Z]*=.' "$cache" &&
   ! grep -q '^CMAKE_CUDA_COMPILER:[A-Z]*=.*NOTFOUND' "$cache"; then
  cmake --build --preset cuda-compile -j"$jobs"
fi
cmake --build --preset release -j"$jobs"
echo "== tests"
ctest --preset release -j"$jobs"

echo "== Python tests (JAX and PyTorch ops against float64 references, gloo data parallel)"
scripts/python_env.sh
.venv/bin/python -m pytest -q tests/python

echo "== tests under ASan + UBSan"
cmake --preset asan-ubsan >/dev/null
cmake --build --preset asan-ubsan -j"$jobs"
ctest --preset asan-ubsan -j"$jobs"

echo "== CPU tests under ThreadSanitizer"
KTO_TSAN_JOBS="$jobs" scripts/tsan.sh

echo "== fuzzing (libFuzzer + ASan + UBSan: saved reproducers, then ${KTO_FUZZ_RUNS:-40000} inputs per target from a fixed seed)"
KTO_FUZZ_JOBS="$jobs" scripts/fuzz.sh
