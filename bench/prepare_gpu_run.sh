#!/usr/bin/env bash
# Prepares, on this machine (PyPI reachable), what bench/gpu_check.sh needs on a lent GPU
# machine, which has no network and no CMake-fetched dependencies:
#   .whl/   the peers of the fused step (Liger 0.8.5, Cut Cross-Entropy 25.1.1) and TRL 1.16
#           with what the GPU image lacks (datasets, dill, multiprocess); the image holds
#           torch, triton, transformers, accelerate, pyarrow and the rest (the device
#           library's KINDS.md);
#   .deps/  Catch2's single header and Eigen's headers, from this machine's /usr/include.
# Both are kept out of git (.git/info/exclude); a device run names them in `carry`
# (about 13 MB together):
#
#   bench/prepare_gpu_run.sh [python-version, default 3.12: the GPU image's]
#   run: bench/gpu_check.sh   carry: [".whl", ".deps"]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
for dir in /.whl/ /.deps/; do
  grep -qx "$dir" .git/info/exclude 2>/dev/null || echo "$dir" >>.git/info/exclude
done
mkdir -p .whl .deps/catch2
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19
cp /usr/include/catch2/catch.hpp .deps/catch2/
rm -rf .deps/eigen3 && cp -r /usr/include/eigen3 .deps/eigen3
du -sh .whl .deps
