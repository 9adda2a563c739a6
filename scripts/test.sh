#!/usr/bin/env bash
# The test command: install what is missing, check the format (scripts/lint.sh),
# build everything with warnings as errors, run every test, then rebuild the
# CPU tests under AddressSanitizer + UBSan and run them again, under
# ThreadSanitizer, for aarch64 under qemu (scripts/isa_matrix.sh), and fuzz the
# CPU entry points (scripts/fuzz.sh). Each build targets its own ISA: release
# -march=native, ASan + UBSan x86-64-v3 (AVX2), TSan x86-64 (SSE2), aarch64, and
# AVX-512 where native lacks it. The build trees and their flags are the presets
# of CMakePresets.json.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
jobs=$(nproc)

echo "== lint (clang-format, ruff)"
scripts/lint.sh

echo "== build (Release, warnings as errors, -march=native: $(c++ -march=native -Q --help=target 2>/dev/null | awk '$1 == "-march=" {print $2}'))"
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

echo "== the install path: sdists and wheels of kto_torch and kto_jax (portable, with their per-ISA CPU copies) in a fresh venv, tested; and against the newest torch on PyPI (scripts/wheel_test.sh)"
KTO_WHEEL_TEST_NEWEST_TORCH=${KTO_WHEEL_TEST_NEWEST_TORCH:-1} scripts/wheel_test.sh

echo "== tests under ASan + UBSan (-march=x86-64-v3: AVX2 + FMA)"
cmake --preset asan-ubsan >/dev/null
cmake --build --preset asan-ubsan -j"$jobs"
ctest --preset asan-ubsan -j"$jobs"

echo "== CPU tests under ThreadSanitizer (-march=x86-64: SSE2)"
KTO_TSAN_JOBS="$jobs" scripts/tsan.sh

KTO_ISA_JOBS="$jobs" scripts/isa_matrix.sh

echo "== fuzzing (libFuzzer + ASan + UBSan: saved reproducers, then ${KTO_FUZZ_RUNS:-40000} inputs per target from a fixed seed)"
KTO_FUZZ_JOBS="$jobs" scripts/fuzz.sh
