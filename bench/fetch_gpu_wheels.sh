#!/usr/bin/env bash
# Downloads, on this machine (PyPI reachable), the wheels bench/gpu_check.sh installs on a
# lent GPU machine, which has no network: the peers of the fused step (Liger 0.8.5,
# Cut Cross-Entropy 25.1.1) and TRL 1.16 with what its image lacks (datasets, dill,
# multiprocess). Its image holds torch, triton, transformers, accelerate, pyarrow and the
# rest (the device library's KINDS.md). They go to .whl/ (kept out of git), which a device
# run names in `carry`; about 5 MB.
#
#   bench/fetch_gpu_wheels.sh [python-version, default 3.12: the GPU image's]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19
du -sh .whl
