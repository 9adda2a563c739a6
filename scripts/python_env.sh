#!/usr/bin/env bash
# Creates the project-local virtual environment .venv with requirements.txt and
# builds the PyTorch and JAX packages (python/kto_torch, python/kto_jax) into it.
# Reuses what is up to date: the packages while requirements.txt is unchanged,
# the two built packages while their sources and the library headers are.
# Also installs the linters of requirements-lint.txt (ruff).
#
#   scripts/python_env.sh          everything
#   scripts/python_env.sh --lint   only the linters (creating .venv if needed):
#                                  what scripts/lint.sh needs, in seconds
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
lint_stamp=.venv/.requirements-lint.sha256
lint_want=$(sha256sum requirements-lint.txt | cut -d' ' -f1)
install_linters() {
  if [ ! -f "$lint_stamp" ] || [ "$(cat "$lint_stamp")" != "$lint_want" ]; then
    .venv/bin/python -m pip install -q -r requirements-lint.txt
    echo "$lint_want" >"$lint_stamp"
  fi
}
new_venv() {
  if ! "$python" -m venv --help >/dev/null 2>&1; then
    echo "python_env: '$python -m venv' is unavailable" >&2
    exit 1
  fi
  rm -rf .venv
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
}
if [ "${1:-}" = --lint ]; then
  [ -x .venv/bin/python ] || new_venv
  install_linters
  exit 0
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
ext_stamp=.venv/.kto_torch.sha256
ext_want=$(cat $(find python/kto_torch python/kto_jax include kernels -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.toml' \
  -o -name '*.hpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' \) -not -path '*/build/*' | sort) |
  sha256sum | cut -d' ' -f1)
build_extension() {
  if [ ! -f "$ext_stamp" ] || [ "$(cat "$ext_stamp")" != "$ext_want" ]; then
    echo "python_env: building the kto_torch and kto_jax packages"
    # For this machine: -march=native (a wheel for others leaves it out; setup.py).
    KTO_NATIVE=1 .venv/bin/python -m pip install -q --no-build-isolation ./python/kto_torch
    KTO_JAX_NATIVE=1 .venv/bin/python -m pip install -q --no-build-isolation ./python/kto_jax
    echo "$ext_want" >"$ext_stamp"
  fi
}
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  install_linters
  build_extension
  exit 0
fi
new_venv
.venv/bin/python -m pip install -q -r requirements.txt
echo "$want" >"$stamp"
install_linters
build_extension
