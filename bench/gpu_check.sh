#!/usr/bin/env bash
# GPU check: build for sm_90, run the `gpu` tests, compute-sanitizer (memcheck,
# racecheck, initcheck, synccheck) on the small cases, then the benchmark;
# prints a short table last. Needs nvcc and an NVIDIA GPU; no CMake, Eigen or
# network: the tests need only Catch2's single header, found in
# /usr/include/catch2, $KTO_CATCH2_DIR or .deps/catch2 (copy it there and
# carry .deps to a machine without it). Logs go to $OUT (or build-gpu/logs).
# Budget: well under 8 minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
arch=${KTO_CUDA_ARCH:-90}
logs=${OUT:-build-gpu/logs}
mkdir -p build-gpu "$logs"
catch=""
for d in "${KTO_CATCH2_DIR:-}" .deps /usr/include; do
  [ -n "$d" ] && [ -f "$d/catch2/catch.hpp" ] && catch=$d && break
done
[ -n "$catch" ] || { echo "gpu_check: catch2/catch.hpp not found (set KTO_CATCH2_DIR)"; exit 2; }

summary=()
note() { summary+=("$1"); echo "== $1"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -1
} 2>&1 | tee "$logs/device.txt"

flags=(-std=c++17 -O3 -arch=sm_$arch -Iinclude -Ikernels -I"$catch" --expt-relaxed-constexpr)
start=$(date +%s)
nvcc "${flags[@]}" tests/gpu/test_cuda_step.cu tests/gpu/gpu_main.cu -o build-gpu/test_cuda_step \
  >"$logs/build.txt" 2>&1 &
build_tests=$!
nvcc "${flags[@]}" bench/bench_cuda.cu -o build-gpu/bench_cuda >>"$logs/build.txt" 2>&1
build_bench=$?
wait $build_tests
build_tests=$?
note "build (sm_$arch): tests rc=$build_tests, bench rc=$build_bench, $(( $(date +%s) - start )) s"
[ $build_tests -eq 0 ] || { cat "$logs/build.txt"; exit 1; }

build-gpu/test_cuda_step --reporter compact >"$logs/gpu_tests.txt" 2>&1
rc=$?
note "gpu tests: rc=$rc, $(grep -E 'SKIPPED|Passed|Failed|passed|failed' "$logs/gpu_tests.txt" | tail -1)"
if [ $rc -eq 77 ]; then
  echo "no CUDA device: nothing more to check"
  exit 0
fi

for tool in memcheck racecheck initcheck synccheck; do
  extra=()
  [ $tool = memcheck ] && extra=(--leak-check full)
  compute-sanitizer --tool $tool "${extra[@]}" --error-exitcode 9 \
    build-gpu/test_cuda_step "[sanitize]" --reporter compact >"$logs/sanitizer_$tool.txt" 2>&1
  rc=$?
  note "compute-sanitizer $tool: rc=$rc, $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$logs/sanitizer_$tool.txt" | tail -1)"
done

if [ $build_bench -eq 0 ]; then
  build-gpu/bench_cuda --vocab 128256,32000 --reps 15 2>&1 | tee "$logs/bench.txt"
fi

echo
echo "==================== summary ===================="
printf '%s\n' "${summary[@]}"
[ -f "$logs/bench.txt" ] && sed -n '/KTO step/,$p' "$logs/bench.txt"
