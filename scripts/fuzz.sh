#!/usr/bin/env bash
# Builds the libFuzzer harnesses of tests/fuzz with clang (ASan + UBSan), runs
# every saved reproducer of tests/fuzz/regressions/<target>/ once, then fuzzes
# each target from its seed corpus. Exits non-zero on any crash, sanitizer
# report or harness finding, printing the reproducer's path.
#
# By default (CI) each target runs a fixed number of inputs from a fixed seed
# in a fresh corpus: the same binary explores the same inputs on every machine,
# so a run that passed before a commit passes in CI (about a minute a target
# here). KTO_FUZZ_SECONDS switches to a time-bounded, randomly seeded session
# that keeps its corpus in build-fuzz/ across runs: the way to look for new
# findings locally.
#
#   KTO_FUZZ_RUNS      inputs per target in the deterministic mode (default 40000)
#   KTO_FUZZ_SECONDS   seconds per target instead (0: saved reproducers only)
#   KTO_FUZZ_TARGETS   targets to run (default: all), e.g. "fuzz_cpu_step fuzz_fused_step"
#   KTO_FUZZ_JOBS      compile jobs (default 1)
#
# Reproduce a crash:    build-fuzz/<target> <file>
# Minimise it:          build-fuzz/<target> -minimize_crash=1 -runs=10000 <file>
# See tests/fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${KTO_FUZZ_SECONDS:-}
runs=${KTO_FUZZ_RUNS:-40000}
targets=${KTO_FUZZ_TARGETS:-"fuzz_validators fuzz_cpu_step fuzz_fused_step"}
jobs=${KTO_FUZZ_JOBS:-1}
out=build-fuzz
cxx=${KTO_FUZZ_CXX:-clang++}
flags=(-std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
       -Wall -Wextra -Werror -I include -I /usr/include/eigen3)
# Inputs are structured, not raw data: 1 KiB holds any problem the harnesses build.
max_len=1024
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

command -v "$cxx" >/dev/null || { echo "fuzz: $cxx not found (scripts/bootstrap.sh installs clang)"; exit 1; }
mkdir -p "$out"

echo "fuzz: building ${targets} with $cxx"
build() {
  local t=$1
  "$cxx" "${flags[@]}" "tests/fuzz/$t.cpp" -o "$out/$t"
}
pids=()
for t in $targets; do
  build "$t" &
  pids+=($!)
  if ((${#pids[@]} >= jobs)); then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p"; done

failed=()
for t in $targets; do
  bin="$out/$t"
  # 1. Saved reproducers: each must now pass.
  regressions=(tests/fuzz/regressions/$t/*)
  n=0
  for f in "${regressions[@]}"; do
    [ -f "$f" ] || continue
    n=$((n + 1))
    if ! "$bin" -rss_limit_mb=2048 -timeout=30 "$f" >"$out/$t.regression.log" 2>&1; then
      echo "fuzz: $t FAILS on saved reproducer $f"
      grep -m3 -E "FINDING|SUMMARY|runtime error|ERROR" "$out/$t.regression.log" | sed 's/^/    /' || true
      echo "    reproduce: $bin $f"
      failed+=("$t:$f")
    fi
  done
  echo "fuzz: $t: $n saved reproducers run"
  [ "$seconds" != "0" ] || continue

  # 2. Fuzzing from the committed seeds: a fixed budget of inputs from a fixed
  # seed in a fresh corpus (deterministic), or a timed session (exploratory).
  artifacts="$out/artifacts/$t/"
  log="$out/$t.log"
  if [ -n "$seconds" ]; then
    corpus="$out/corpus/$t"
    budget=(-max_total_time="$seconds")
    echo "fuzz: $t for ${seconds}s (log $log)"
  else
    corpus="$out/corpus-fixed/$t"
    rm -rf "$corpus"
    budget=(-runs="$runs" -seed=1)
    echo "fuzz: $t, $runs inputs from seed 1 (log $log)"
  fi
  mkdir -p "$corpus" "$artifacts"
  set +e
  "$bin" "${budget[@]}" -max_len="$max_len" -len_control=0 -timeout=30 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$artifacts" "$corpus" "tests/fuzz/corpus/$t" \
    >"$log" 2>&1
  rc=$?
  set -e
  grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb" "$log" | sed "s/^/    /" || true
  if ((rc != 0)); then
    repro=$(grep -o "Test unit written to .*" "$log" | tail -1 | sed 's/Test unit written to //')
    echo "fuzz: $t CRASHED (exit $rc)"
    grep -m5 -E "FINDING|SUMMARY|runtime error|ERROR|terminate called|what\(\)" "$log" |
      sed 's/^/    /' || true
    echo "    reproducer: ${repro:-see $log}"
    [ -n "$repro" ] && echo "    reproduce: $bin $repro"
    failed+=("$t:${repro:-$log}")
  fi
done

if ((${#failed[@]})); then
  echo "fuzz: FAILED: ${failed[*]}"
  exit 1
fi
echo "fuzz: all targets passed"
