"""Which built copy of the CPU code to load (runtime ISA dispatch), for kto_torch and kto_jax
alike: python/kto_jax/kto_jax/_isa_levels.py is a symlink to this file (each wheel and sdist
holds a copy). Pure Python: the packages find their copies and ask the CPU's level; this
decides, honouring KTO_CPU_ISA, and says why when no copy can run."""

from __future__ import annotations

import os

LEVELS = ("x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4")
EXTRA_LEVELS = ("x86-64-v3", "x86-64-v4")  # the copies built beside the baseline


def rank(level: str) -> int:
    return LEVELS.index(level) if level in LEVELS else -1


def choose(built, cpu: str, package: str, native_variable: str) -> str:
    """The level to load of `built` (the levels of the installed copies) on a CPU that runs
    `cpu`: KTO_CPU_ISA when set (an ImportError if not built or not runnable), else the
    highest one the CPU runs."""
    forced = os.environ.get("KTO_CPU_ISA", "")
    if forced:
        if forced not in built:
            raise ImportError(f"{package}: KTO_CPU_ISA={forced!r} was not built; built: "
                              f"{sorted(built)}")
        if rank(forced) > rank(cpu):
            raise ImportError(f"{package}: KTO_CPU_ISA={forced!r} needs a CPU this one is not "
                              f"(it runs {cpu})")
        return forced
    runnable = [level for level in built if rank(level) <= rank(cpu)]
    if not runnable:  # a native build made on another machine
        raise ImportError(f"{package}: this build's CPU code needs {sorted(built)}, and this "
                          f"CPU runs {cpu}: reinstall without {native_variable}=1 (or on this "
                          "machine)")
    return max(runnable, key=rank)
