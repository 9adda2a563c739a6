#!/usr/bin/env bash
# GPU check, one script for a lent H100/H200: builds for sm_90, runs the `gpu`
# tests (logits step and fused linear), compute-sanitizer (memcheck, racecheck,
# initcheck, synccheck) on the [sanitize] cases, the benchmarks (logits step vs
# the bandwidth floor, fused linear vs the bf16 GEMM peak), the PyTorch CUDA op
# tests and the peer comparison (TRL 1.16's chunked head, Liger, Cut
# Cross-Entropy, eager and compiled PyTorch); prints a short table last.
# Needs nvcc and an NVIDIA GPU, no network, no CMake: Catch2's single header
# and Eigen's headers come from /usr/include, $KTO_CATCH2_DIR /
# $KTO_EIGEN_DIR or .deps (catch2/catch.hpp, eigen3/); the peers and TRL from
# wheels in .whl (bench/prepare_gpu_run.sh fills both; carry them). Logs go
# to build-gpu/logs, and as one logs.tar.gz with summary.txt to $OUT when set.
# Budget: about 3 minutes on an H200 (plus about 2 for trl). GPU_CHECK_PARTS
# (default all) picks parts: tests, sanitize, bench, torch, jax (needs a CUDA
# jaxlib), compare, trl (TRL 1.16's trainer step against the drop-in,
# bench/compare_trl.py --device cuda; needs trl, transformers, accelerate and
# datasets, from .whl wheels where the machine lacks them) (and fused_bench: the
# fused benchmark alone).
set -uo pipefail
cd "$(dirname "$0")/.."
arch=${KTO_CUDA_ARCH:-90}
logs=build-gpu/logs
rm -rf "$logs"
mkdir -p build-gpu "$logs"
catch=""
for d in "${KTO_CATCH2_DIR:-}" .deps /usr/include; do
  [ -n "$d" ] && [ -f "$d/catch2/catch.hpp" ] && catch=$d && break
done
[ -n "$catch" ] || { echo "gpu_check: catch2/catch.hpp not found (set KTO_CATCH2_DIR)"; exit 2; }
eigen=""
for d in "${KTO_EIGEN_DIR:-}" .deps/eigen3 /usr/include/eigen3; do
  [ -n "$d" ] && [ -f "$d/Eigen/Core" ] && eigen=$(cd "$d" && pwd) && break
done

parts=${GPU_CHECK_PARTS:-tests,sanitize,bench,torch,jax,compare,trl}
want() { [[ ",$parts," == *",$1,"* ]]; }
summary=()
note() { summary+=("$1"); echo "== $1"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -1
} 2>&1 | tee "$logs/device.txt"

# The PyTorch extension (CPU-bound) builds in the background while the GPU works.
torch_site=/tmp/kto_site
if want torch && [ -n "$eigen" ] && python3 -c "import torch" 2>/dev/null; then
  (KTO_EIGEN_DIR=$eigen KTO_CUDA_ARCHS=$arch MAX_JOBS=6 timeout 400 python3 -m pip install -q \
    --no-build-isolation --no-deps --no-index --target $torch_site ./python/kto_torch \
    >"$logs/torch_build.txt" 2>&1; echo $? >build-gpu/torch_build.rc) &
  torch_build=$!
else
  torch_build=""
  echo "no Eigen headers or no torch: the PyTorch extension is not built" >"$logs/torch_build.txt"
fi
site=/tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target $site .whl/*.whl >"$logs/wheels.txt" 2>&1 || true
fi

flags=(-std=c++17 -O3 -arch=sm_$arch -Iinclude -Ikernels -I"$catch" --expt-relaxed-constexpr)
start=$(date +%s)
build() {  # name sources... [-- libs]
  local name=$1
  shift
  nvcc "${flags[@]}" "$@" -o "build-gpu/$name" >"$logs/build_$name.txt" 2>&1
}
if want fused_bench && ! want bench; then  # the fused benchmark alone
  build bench_fused_cuda bench/bench_fused_cuda.cu -lcublas
  note "build (sm_$arch): bench_fused_cuda rc=$?"
  timeout 120 build-gpu/bench_fused_cuda --dim 1024,4096 --chunk-mb "${GPU_CHECK_CHUNKS:-1024}" \
    --reps 10 >"$logs/bench_fused_cuda.txt" 2>&1
  note "bench_fused_cuda: rc=$?"
fi
if want tests || want sanitize || want bench; then
  build test_cuda_step tests/cpp/cuda/test_cuda_step.cu tests/cpp/cuda/gpu_main.cu &
  p1=$!
  build test_cuda_fused_linear tests/cpp/cuda/test_cuda_fused_linear.cu tests/cpp/cuda/gpu_main.cu -lcublas &
  p2=$!
  build bench_cuda bench/bench_cuda.cu &
  p3=$!
  build bench_fused_cuda bench/bench_fused_cuda.cu -lcublas &
  p4=$!
  rcs=()
  for p in $p1 $p2 $p3 $p4; do
    wait $p
    rcs+=($?)
  done
  note "build (sm_$arch): test_cuda_step rc=${rcs[0]}, test_cuda_fused_linear rc=${rcs[1]}, bench_cuda rc=${rcs[2]}, bench_fused_cuda rc=${rcs[3]}, $(($(date +%s) - start)) s"
  for f in "$logs"/build_*.txt; do [ -s "$f" ] && { echo "--- $f"; tail -20 "$f"; }; done
fi

for t in test_cuda_step test_cuda_fused_linear; do
  [ -x build-gpu/$t ] && want tests || continue
  timeout 240 build-gpu/$t --reporter compact >"$logs/$t.txt" 2>&1
  rc=$?
  note "$t: rc=$rc, $(grep -E 'SKIPPED|Passed|passed|failed' "$logs/$t.txt" | tail -1)"
  [ $rc -eq 77 ] && { echo "no CUDA device: nothing more to check"; exit 0; }
  [ $rc -ne 0 ] && grep -B2 -A12 'FAILED' "$logs/$t.txt" | head -60
done

for t in test_cuda_step test_cuda_fused_linear; do
  [ -x build-gpu/$t ] && want sanitize || continue
  for tool in memcheck racecheck initcheck synccheck; do
    extra=()
    [ $tool = memcheck ] && extra=(--leak-check full)
    timeout 90 compute-sanitizer --tool $tool "${extra[@]}" --error-exitcode 9 \
      build-gpu/$t "[sanitize]" --reporter compact >"$logs/sanitizer_${t}_$tool.txt" 2>&1
    rc=$?
    note "compute-sanitizer $tool $t: rc=$rc, $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|passed|failed' "$logs/sanitizer_${t}_$tool.txt" | tail -1)"
  done
done

[ -n "$torch_build" ] && wait $torch_build
note "PyTorch extension build: rc=$(cat build-gpu/torch_build.rc 2>/dev/null || echo none)"
[ -s "$logs/torch_build.txt" ] && tail -15 "$logs/torch_build.txt"
export PYTHONPATH=$torch_site:$site${PYTHONPATH:+:$PYTHONPATH}

if want bench; then
  timeout 90 build-gpu/bench_cuda --vocab 128256,32000 --reps 15 >"$logs/bench_cuda.txt" 2>&1
  note "bench_cuda: rc=$?"
  timeout 150 build-gpu/bench_fused_cuda --dim 1024,4096 --chunk-mb "${GPU_CHECK_CHUNKS:-512,1024,4096}" --reps 10 \
    >"$logs/bench_fused_cuda.txt" 2>&1
  note "bench_fused_cuda: rc=$?, $(grep -c 'finite: yes' "$logs/bench_fused_cuda.txt") finite losses"
  # Compact scoring on a batch whose rows are half prompt (issue 12, target 3).
  timeout 90 build-gpu/bench_fused_cuda --dim 1024,4096 --chunk-mb 1024 --reps 5 \
    --prompt-fraction 0.5 >"$logs/bench_fused_compact.txt" 2>&1
  note "bench_fused_cuda half prompt: rc=$?"
fi

if [ -f build-gpu/torch_build.rc ] && [ "$(cat build-gpu/torch_build.rc)" = 0 ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/python/torch/test_torch.py \
    tests/python/torch/test_torch_fused.py tests/python/torch/test_torch_logit_transform.py \
    tests/python/torch/test_torch_token_statistics.py tests/python/torch/test_torch_frozen_head.py \
    -k cuda >"$logs/pytest_cuda.txt" 2>&1
  note "pytest CUDA ops: rc=$?, $(tail -1 "$logs/pytest_cuda.txt")"
fi
if want jax; then
  # kto_jax's CUDA handlers against its CPU ones (tests/python/jax/test_jax_cuda.py).
  # Needs a CUDA build of jaxlib on this machine (carry its wheels: the device
  # README says how); without one this part only notes the skip.
  if python3 -c "import jax, sys; sys.exit(0 if jax.devices('cuda') else 1)" >/dev/null 2>&1; then
    python3 -m pip install -q --no-build-isolation --target build-gpu/jax_site ./python/kto_jax \
      >"$logs/jax_build.txt" 2>&1
    PYTHONPATH=build-gpu/jax_site:$PYTHONPATH timeout 150 python3 -m pytest -q -p no:cacheprovider \
      tests/python/jax/test_jax_cuda.py >"$logs/pytest_jax_cuda.txt" 2>&1
    note "pytest kto_jax CUDA: rc=$?, $(tail -1 "$logs/pytest_jax_cuda.txt")"
  else
    note "kto_jax CUDA: skipped (no CUDA build of jaxlib on this machine)"
  fi
fi
if want compare; then
  PYTHONUNBUFFERED=1 timeout 300 python3 bench/compare_fused_torch.py \
    --dims "${GPU_CHECK_DIMS:-1024,4096}" --reps 8 --json "$logs/compare_fused.json" \
    >"$logs/compare_fused.txt" 2>&1
  note "compare_fused_torch: rc=$?"
  grep -E 'failed|not measured|not usable|fp32 logits' "$logs/compare_fused.txt" | head -8
fi

if want trl; then
  if python3 -c "import trl, transformers, accelerate, datasets" >/dev/null 2>&1; then
    PYTHONUNBUFFERED=1 timeout 200 python3 bench/compare_trl.py --device cuda \
      --vocab 32000,128256 --impls trl,default,logits --steps 6 --warmup 2 \
      --json "$logs/compare_trl.json" >"$logs/compare_trl.txt" 2>&1
    note "compare_trl (cuda): rc=$?"
  else
    note "compare_trl: skipped (trl, transformers, accelerate or datasets missing)"
  fi
fi

{
  echo "==================== summary ===================="
  printf '%s\n' "${summary[@]}"
  [ -f "$logs/bench_cuda.txt" ] && sed -n '/KTO step/,$p' "$logs/bench_cuda.txt"
  [ -f "$logs/bench_fused_cuda.txt" ] && sed -n '/^device:/p;/^fused-linear KTO step/,$p' "$logs/bench_fused_cuda.txt"
  [ -f "$logs/bench_fused_compact.txt" ] && grep -E 'policy step, keep' "$logs/bench_fused_compact.txt"
  [ -f "$logs/compare_fused.txt" ] && sed -n '/^peer comparison/,$p' "$logs/compare_fused.txt"
  [ -f "$logs/compare_trl.txt" ] && grep -E '^machine:|^\|' "$logs/compare_trl.txt"
} | tee "$logs/summary.txt"
if [ -n "${OUT:-}" ]; then
  cp "$logs/summary.txt" "$OUT/summary.txt"
  tar czf "$OUT/logs.tar.gz" -C build-gpu logs
fi
