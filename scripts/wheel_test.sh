#!/usr/bin/env bash
# The install path users take, tested. In a fresh virtual environment under a
# temporary directory (never .venv), with the pinned torch and jax of
# requirements.txt and Eigen from PyPI (cmeel-eigen):
#   1. `python -m build --no-isolation` makes the sdist of kto_torch and of kto_jax,
#      then each wheel from its sdist alone, unpacked outside the repository (both
#      packages at once, one per core); the source tree must not change;
#   2. a missing Eigen is an error that says how to get it;
#   3. the wheels are installed (not editable), and the chosen tests of tests/python
#      run against them from a directory where the repository is not on sys.path;
#   4. with KTO_WHEEL_TEST_NEWEST_TORCH=1, the same for kto_torch against the newest
#      torch on PyPI, in a second environment: pip builds the wheel from the sdist,
#      and test_torch.py runs against it.
# Prints the wheel and sdist sizes and the build and install times.
#
#   KTO_WHEEL_TEST_NEWEST_TORCH=1   also stage 4 (downloads torch and its CUDA runtime
#                                   wheels, a few GB)
#   KTO_WHEEL_TEST_KEEP=1           keep the temporary directory (printed)
#   KTO_TORCH_CUDA, KTO_JAX_CUDA    default 0 here: the CUDA parts are compiled by the
#                                   release build and scripts/python_env.sh, and no GPU
#                                   runs them in CI; set to 1 to build them into the wheels
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
python=${PYTHON:-python3}
export KTO_TORCH_CUDA=${KTO_TORCH_CUDA:-0} KTO_JAX_CUDA=${KTO_JAX_CUDA:-0}
# What `python -m build` needs besides setuptools and wheel (pinned in requirements.txt).
build_pin=build==1.6.1
eigen_pin=cmeel-eigen==3.4.1
# The tests run against the installed wheels: both packages' ops against the float64
# references, the two against each other, the documentation's snippets.
tests=(torch/test_torch.py torch/test_torch_isa.py jax/test_jax.py jax/test_jax_isa.py jax/test_jax_torch.py test_docs.py)

work=$(mktemp -d "${TMPDIR:-/tmp}/kto-wheel-test.XXXXXX")
if [ "${KTO_WHEEL_TEST_KEEP:-0}" = 1 ]; then
  echo "wheel_test: keeping $work"
else
  trap 'rm -rf "$work"' EXIT
fi
start=$SECONDS
stamp() { echo "wheel_test: [$((SECONDS - start)) s] $*"; }
# The requirement lines of requirements.txt for these packages (pins and constraints).
pinned() { for p in "$@"; do grep -i -E "^${p}==" requirements.txt || { echo "wheel_test: $p is not pinned in requirements.txt" >&2; exit 1; }; done; }
size() { du -h --apparent-size "$1" | cut -f1; }
# The files under python/ that git does not track (untracked or ignored): what a
# build that writes into the source tree leaves (build/, *.egg-info, dist/, kto_src/).
tree_state() {
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git status --porcelain --ignored --untracked-files=all python/ | grep -E '^(\?\?|!!)' || true
  fi
}
# Runs "$@" with its output in $log; on failure prints the log's tail and stops.
logged() {
  local log=$1; shift
  if ! "$@" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "wheel_test: FAILED: $*" >&2
    exit 1
  fi
}

stamp "a fresh environment with the pinned torch and jax ($work/venv)"
pins=$(pinned torch jax jaxlib numpy pytest hypothesis setuptools wheel)
"$python" -m venv "$work/venv"
py=$work/venv/bin/python
# shellcheck disable=SC2086 # one requirement a word
logged "$work/venv.log" "$py" -m pip install -c requirements.txt $pins "$build_pin" "$eigen_pin"
stamp "$("$py" -c 'import torch, jax; print("torch", torch.__version__, "jax", jax.__version__)')"

stamp "python -m build --no-isolation (sdist, then the wheel from the sdist): kto_torch and kto_jax"
before=$(tree_state)
pids=()
for pkg in kto_torch kto_jax; do
  (cd "python/$pkg" && begin=$SECONDS && logged "$work/build-$pkg.log" "$py" -m build --no-isolation \
     --outdir "$work/dist-$pkg" . && echo "$((SECONDS - begin))" >"$work/build-$pkg.seconds") &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
[ "$failed" = 0 ] || exit 1
for pkg in kto_torch kto_jax; do
  grep -h -E '^kto_(torch|jax) [0-9.]+: ' "$work/build-$pkg.log" | sort -u | sed 's/^/  /' || true
  for f in "$work/dist-$pkg"/*; do echo "  $(basename "$f")  $(size "$f")"; done
  echo "  built in $(cat "$work/build-$pkg.seconds") s"
done
after=$(tree_state)
if [ "$before" != "$after" ]; then
  echo "wheel_test: the build wrote into the source tree:" >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi
stamp "the source tree is unchanged"
for pkg in kto_torch kto_jax; do
  tar -tzf "$work/dist-$pkg"/*.tar.gz >"$work/sdist-$pkg.txt"
  grep -q '/kto_src/include/kto/config.hpp$' "$work/sdist-$pkg.txt" ||
    { echo "wheel_test: the $pkg sdist lacks kto_src/include" >&2; exit 1; }
done

stamp "a missing Eigen is an error that says how to get it"
if KTO_EIGEN_DIR="$work/no-eigen" "$py" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation \
     -w "$work/no-eigen-wheel" "$work/dist-kto_torch"/*.tar.gz >"$work/no-eigen.log" 2>&1; then
  echo "wheel_test: built without Eigen" >&2; exit 1
fi
grep -q 'apt-get install libeigen3-dev' "$work/no-eigen.log" ||
  { tail -n 30 "$work/no-eigen.log"; echo "wheel_test: no Eigen hint in the error" >&2; exit 1; }

stamp "installing the wheels (not editable)"
SECONDS_INSTALL=$SECONDS
logged "$work/install.log" "$py" -m pip install "$work/dist-kto_torch"/*.whl "$work/dist-kto_jax"/*.whl
echo "  installed in $((SECONDS - SECONDS_INSTALL)) s"

# From a directory outside the repository: the installed packages are what is imported.
mkdir -p "$work/run"
cd "$work/run"
"$py" - "$work/venv" <<'EOF'
import sys
from importlib.metadata import version
from pathlib import Path

import kto_jax
import kto_torch

venv = Path(sys.argv[1]).resolve()
for m in (kto_torch, kto_jax):
    print(f"  {m.__name__} {version(m.__name__)} from {m.__file__}")
    if venv not in Path(m.__file__).resolve().parents:
        sys.exit(f"wheel_test: {m.__name__} is not the installed wheel")
EOF
stamp "tests/python against the installed wheels: ${tests[*]}"
PYTHONDONTWRITEBYTECODE=1 "$py" -m pytest -q -p no:cacheprovider "${tests[@]/#/$repo/tests/python/}"
cd "$repo"

if [ "${KTO_WHEEL_TEST_NEWEST_TORCH:-0}" = 1 ]; then
  stamp "the newest torch on PyPI ($work/newest)"
  pins=$(pinned numpy pytest)
  "$python" -m venv "$work/newest"
  npy=$work/newest/bin/python
  # shellcheck disable=SC2086 # one requirement a word
  logged "$work/newest.log" "$npy" -m pip install --upgrade torch setuptools wheel $pins "$eigen_pin"
  stamp "$("$npy" -c 'import torch; print("torch", torch.__version__)')"
  SECONDS_NEWEST=$SECONDS
  KTO_TORCH_CUDA=0 logged "$work/newest-build.log" "$npy" -m pip wheel --no-cache-dir --no-deps \
    --no-build-isolation -v -w "$work/dist-newest" "$work/dist-kto_torch"/*.tar.gz
  grep -h -o -E 'kto_torch [0-9.]+: .*' "$work/newest-build.log" | sort -u | sed 's/^/  /' || true
  echo "  built from the sdist in $((SECONDS - SECONDS_NEWEST)) s"
  logged "$work/newest-install.log" "$npy" -m pip install --no-deps "$work/dist-newest"/*.whl
  cd "$work/run"
  # test_torch.py skips where kto_torch does not import: import it first.
  "$npy" -c 'import torch, kto_torch; print("  kto_torch from", kto_torch.__file__, "on torch", torch.__version__)'
  PYTHONDONTWRITEBYTECODE=1 "$npy" -m pytest -q -p no:cacheprovider "$repo/tests/python/torch/test_torch.py"
  cd "$repo"
fi
stamp "done"
