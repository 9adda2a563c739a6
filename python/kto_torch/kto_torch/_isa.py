"""Runtime ISA dispatch for the CPU kernels.

Eigen picks its SIMD width when the extension is compiled, so one binary cannot be both
portable and fast. The package therefore carries the CPU ops once per x86-64 level
(setup.py): ``_C`` for the baseline (it also holds the CUDA ops), and where the compiler
could build them ``_C_x86_64_v3`` (AVX2 + FMA) and ``_C_x86_64_v4`` (AVX-512), each a
CPU-only copy of the same source. At import, the best copy this CPU runs is loaded
(``_C.cpu_isa()``, compiled for the baseline, asks the CPU); only that copy's code runs,
so no instruction the CPU lacks is ever reached. ``KTO_CPU_ISA=x86-64|x86-64-v3|x86-64-v4``
picks a copy by hand (an error if the CPU cannot run it or it was not built); a build
with ``KTO_NATIVE=1`` is one ``_C`` for the build machine and has no copies.
"""

from __future__ import annotations

import importlib
import importlib.util

from . import _C
from ._isa_levels import EXTRA_LEVELS, choose, rank


def _module_name(level: str) -> str:
    return "_C_" + level.replace("-", "_")


def _variants() -> dict:
    """{level: module name} of every copy that was built, ``_C`` included. The copies are
    found by name, not imported: importing one runs its code, which must not happen on a
    CPU that lacks its instructions."""
    found = {_C.compiled_isa(): "_C"}
    for level in EXTRA_LEVELS:
        if importlib.util.find_spec(f"{__package__}.{_module_name(level)}") is not None:
            found.setdefault(level, _module_name(level))
    return found


def _select():
    variants = _variants()
    level = choose(variants, _C.cpu_isa(), "kto_torch", "KTO_NATIVE")
    return importlib.import_module(f".{variants[level]}", __package__)


CPU = _select()
"""The extension module whose CPU ops this process runs."""

BUILT = tuple(sorted(_variants(), key=rank))
"""The x86-64 levels this installation carries CPU ops for."""
