#!/usr/bin/env bash
# The test command: install what is missing, build everything, run every test,
# then rebuild the CPU tests under AddressSanitizer + UBSan and run them again,
# under ThreadSanitizer, and fuzz the CPU entry points (scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
jobs=$(nproc)

echo "== build (Release)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$jobs"
echo "== tests"
ctest --test-dir build -j"$jobs" --output-on-failure

echo "== Python tests (JAX and PyTorch ops against float64 references, gloo data parallel)"
scripts/python_env.sh
.venv/bin/python -m pytest -q tests/python

echo "== tests under ASan + UBSan"
san="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"
# GCC 12 flags its own AVX-512 intrinsics (`__m512 __Y = __Y;`) under the sanitizers.
warn="-Wno-uninitialized"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKTO_BUILD_BENCHMARKS=OFF -DKTO_ENABLE_CUDA=OFF \
  -DCMAKE_CXX_FLAGS="$san $warn" -DCMAKE_EXE_LINKER_FLAGS="$san" >/dev/null
cmake --build build-asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build-asan -j"$jobs" --output-on-failure -LE package

echo "== CPU tests under ThreadSanitizer"
KTO_TSAN_JOBS="$jobs" scripts/tsan.sh

echo "== fuzzing (libFuzzer + ASan + UBSan: saved reproducers, then ${KTO_FUZZ_RUNS:-40000} inputs per target from a fixed seed)"
KTO_FUZZ_JOBS="$jobs" scripts/fuzz.sh
