#!/usr/bin/env bash
# Installs the Debian packages kto builds and tests with, when they are missing.
# Safe to run repeatedly: it only calls apt-get when something is absent.
set -euo pipefail
packages=(cmake g++ make libeigen3-dev catch2 libbenchmark-dev openmpi-bin libopenmpi-dev
          clang libclang-rt-14-dev  # clang + libFuzzer's runtime: scripts/fuzz.sh
          clang-format              # scripts/lint.sh
          g++-aarch64-linux-gnu qemu-user-static)  # scripts/isa_matrix.sh: the aarch64 stage
missing=()
# The Python tests need a python3 that can make virtual environments.
python3 -m venv --help >/dev/null 2>&1 || packages+=(python3 python3-venv python3-pip)
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
