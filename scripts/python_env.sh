#!/usr/bin/env bash
# Creates the project-local virtual environment .venv with requirements.txt.
# Reuses an existing .venv whose recorded requirements match; rebuilds otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python=${PYTHON:-python3}
if ! "$python" -m venv --help >/dev/null 2>&1; then
  echo "python_env: '$python -m venv' is unavailable" >&2
  exit 1
fi
rm -rf .venv
"$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
echo "$want" >"$stamp"
