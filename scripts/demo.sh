#!/usr/bin/env bash
# The main job: build the library's demo and train a tiny LM with KTO from
# binary feedback (embedded defaults; extra arguments go to the program).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build --target tiny_lm_kto -j"$(nproc)" >/dev/null
exec build/examples/tiny_lm_kto "$@"
