#!/usr/bin/env bash
# Builds bench_cpu (Release, -march=native) and runs it: 5 repetitions, medians,
# console table plus JSON in build/bench_cpu.json. Extra args go to the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DKTO_BUILD_BENCHMARKS=ON >/dev/null
cmake --build build --target bench_cpu -j"$(nproc)" >/dev/null
build/bench/bench_cpu --benchmark_repetitions=5 --benchmark_report_aggregates_only=true \
  --benchmark_min_time=0.2 --benchmark_out=build/bench_cpu.json --benchmark_out_format=json "$@" |
  grep -E "^Benchmark|^-|_median"
