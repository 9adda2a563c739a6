"""Shared by test_torch_isa.py and test_jax_isa.py: the x86-64 levels in order, which
built copies a CPU runs, and a fresh process that runs a probe under KTO_CPU_ISA."""

import os
import subprocess
import sys
from pathlib import Path

LEVELS = ("x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4")


def rank(level: str) -> int:
    return LEVELS.index(level) if level in LEVELS else -1


def runnable(info: dict) -> list:
    """The built levels the CPU of build_info() `info` runs."""
    return [level for level in info["built_isas"] if rank(level) <= rank(info["cpu_isa"])]


def run_probe(code: str, level):
    """`code` in a fresh Python with KTO_CPU_ISA=level (None: the package's own choice),
    away from the source tree, so that the installed package is the one imported."""
    env = dict(os.environ)
    env.pop("KTO_CPU_ISA", None)
    if level is not None:
        env["KTO_CPU_ISA"] = level
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=Path("/"),
                          capture_output=True, text=True)
