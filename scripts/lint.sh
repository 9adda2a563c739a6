#!/usr/bin/env bash
# The format and lint gates of CI (scripts/test.sh runs this first):
#   clang-format (.clang-format) over the tracked C++/CUDA sources: no change wanted;
#   ruff check (ruff.toml, ruff pinned in requirements-lint.txt) over the tracked Python files.
# Each failure ends with the command that fixes it. Installs ruff into .venv
# (scripts/python_env.sh --lint) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0

clang_format=${CLANG_FORMAT:-clang-format}
command -v "$clang_format" >/dev/null ||
  { echo "lint: $clang_format not found (scripts/bootstrap.sh installs clang-format)"; exit 1; }
mapfile -t sources < <(git ls-files '*.cpp' '*.hpp' '*.h' '*.cu' '*.cuh')
if ! "$clang_format" --dry-run --Werror "${sources[@]}"; then
  echo "lint: C++/CUDA sources are not clang-formatted. Fix with:"
  echo "    git ls-files '*.cpp' '*.hpp' '*.h' '*.cu' '*.cuh' | xargs $clang_format -i"
  status=1
else
  echo "lint: clang-format: ${#sources[@]} files formatted"
fi

scripts/python_env.sh --lint
mapfile -t python < <(git ls-files '*.py')
if ! .venv/bin/ruff check --quiet "${python[@]}"; then
  echo "lint: ruff found the problems above (rules: ruff.toml). Fix them by hand, or those"
  echo "marked [*] with:"
  echo "    .venv/bin/ruff check --fix <file>..."
  status=1
else
  echo "lint: ruff check: ${#python[@]} files clean"
fi
exit "$status"
