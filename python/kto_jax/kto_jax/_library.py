"""kto_jax's shared libraries: the CPU handlers (the copy for the best x86-64 level this
CPU runs, runtime ISA dispatch) and, where built, the CUDA handlers; the library's
binding-contract constants read from them (option, metric and per-example row names,
the named options' value names, default chunk budgets); the FFI targets' registration.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import jax

from . import _build, _isa_levels

# FFI target name → symbol in the libraries (the same names on CPU and CUDA).
_TARGETS = {
    "kto_sequence_logprobs": "KtoSequenceLogprobs",
    "kto_kl_partial": "KtoKlPartial",
    "kto_step_forward": "KtoStepForward",
    "kto_step_backward": "KtoStepBackward",
    "kto_fused_linear_logprobs": "KtoFusedLinearLogprobs",
    "kto_fused_linear_row_partials": "KtoFusedLinearRowPartials",
    "kto_fused_linear_step": "KtoFusedLinearStep",
}


def _installed(stem: str) -> Path | None:
    found = sorted(Path(__file__).resolve().parent.glob(f"{stem}*.so"))
    return found[0] if found else None


def _cpu_isa(baseline: Path) -> str:
    """The level this CPU runs, asked of the baseline library (compiled for any x86-64)."""
    lib = ctypes.cdll.LoadLibrary(str(baseline))
    lib.KtoCpuIsa.restype = lib.KtoCompiledIsa.restype = ctypes.c_char_p
    return lib.KtoCpuIsa().decode()


def _cpu_variants() -> dict:
    """{level: path} of the CPU library's installed copies (runtime ISA dispatch): the
    baseline _kto_jax_cpu (level asked of it) and, where built, _kto_jax_cpu_x86_64_v3 / _v4,
    found by name: loading a copy runs its code, which must not happen on a CPU that
    lacks its instructions."""
    here = Path(__file__).resolve().parent
    found = {}
    for path in sorted(here.glob("_kto_jax_cpu.*so")):
        lib = ctypes.cdll.LoadLibrary(str(path))
        lib.KtoCompiledIsa.restype = ctypes.c_char_p
        found.setdefault(lib.KtoCompiledIsa().decode(), path)
    for level in _isa_levels.EXTRA_LEVELS:
        for path in sorted(here.glob(f"_kto_jax_cpu_{level.replace('-', '_')}.*so")):
            found.setdefault(level, path)
    return found


@functools.lru_cache(maxsize=None)
def cpu_library() -> Path:
    """The CPU handlers' library: of the installed copies, the one for the highest x86-64
    level this CPU runs (KTO_CPU_ISA picks one by hand); in the source tree only,
    compiled once into $KTO_JAX_BUILD or build/jax."""
    variants = _cpu_variants()
    if not variants:
        if not _build.CPU_SOURCE.exists():
            raise ImportError("kto_jax: the FFI library is missing; reinstall with "
                              "`pip install --no-build-isolation ./python/kto_jax`")
        build_dir = Path(os.environ.get("KTO_JAX_BUILD", _build.ROOT / "build" / "jax"))
        return _build.build_in_source_tree(build_dir)
    cpu = _cpu_isa(next(iter(variants.values())))  # the first found is the baseline
    return variants[_isa_levels.choose(variants, cpu, "kto_jax", "KTO_JAX_NATIVE")]


def build_info() -> dict:
    """How this installation was built and what it runs: the x86-64 level of the CPU
    handlers this CPU dispatched to (``dispatched_isa``, of ``built_isas``), the CPU's own
    level, Eigen's version and SIMD sets, and whether CUDA handlers were built."""
    lib = ctypes.cdll.LoadLibrary(str(cpu_library()))
    lib.KtoCompiledIsa.restype = lib.KtoCpuIsa.restype = lib.KtoEigenSimd.restype = \
        ctypes.c_char_p
    version = lib.KtoEigenVersion()
    return {"dispatched_isa": lib.KtoCompiledIsa().decode(),
            "built_isas": sorted(_cpu_variants(), key=_isa_levels.rank),
            "cpu_isa": lib.KtoCpuIsa().decode(),
            "eigen_version": f"{version // 10000}.{version // 100 % 100}.{version % 100}",
            "eigen_simd": lib.KtoEigenSimd().decode(),
            "threads": os.cpu_count(),
            "cuda_handlers": cuda_library() is not None,
            "jax": jax.__version__}


def cuda_library() -> Path | None:
    """The CUDA handlers' library, when the install found nvcc."""
    return _installed("_kto_jax_cuda")


def _library_contract():
    """The library's constants (kto/options.hpp, kto/metrics.hpp, kto/fused_linear.hpp),
    read from the CPU library: option names and the names of each named option's values,
    metric names, per-example row names, the fused strategies' names, default chunk budgets
    (CPU, CUDA)."""
    lib = ctypes.cdll.LoadLibrary(str(cpu_library()))
    for f in (lib.KtoOptionName, lib.KtoOptionChoiceName, lib.KtoMetricName,
              lib.KtoExampleOutputName, lib.KtoStrategyName):
        f.restype = ctypes.c_char_p
    lib.KtoDefaultChunkBytes.restype = ctypes.c_int64
    options = tuple(lib.KtoOptionName(i).decode() for i in range(lib.KtoOptionCount()))
    choices = {name: {lib.KtoOptionChoiceName(i, code).decode(): code
                      for code in range(lib.KtoOptionChoiceCount(i))}
               for i, name in enumerate(options) if lib.KtoOptionChoiceCount(i) > 0}
    metrics = tuple(lib.KtoMetricName(i).decode() for i in range(lib.KtoMetricCount()))
    rows = tuple(lib.KtoExampleOutputName(i).decode()
                 for i in range(lib.KtoExampleOutputCount()))
    strategies = {lib.KtoStrategyName(code).decode(): code
                  for code in range(lib.KtoStrategyCount())}
    return (options, choices, metrics, rows, strategies,
            (lib.KtoDefaultChunkBytes(0), lib.KtoDefaultChunkBytes(1)))


(OPTION_NAMES, OPTION_CHOICES, METRIC_NAMES, PER_EXAMPLE_NAMES, STRATEGIES,
 (DEFAULT_CHUNK_BYTES, DEFAULT_CUDA_CHUNK_BYTES)) = _library_contract()
LOSS_TYPES = OPTION_CHOICES["loss_type"]
LINKS = OPTION_CHOICES["link"]
REFERENCE_POINTS = OPTION_CHOICES["reference_point"]
KL_ESTIMATORS = OPTION_CHOICES["kl_estimator"]
REDUCTIONS = OPTION_CHOICES["reduction"]


def _chunk_bytes(chunk_bytes):
    """The caller's chunk budget, or the library's default for the default backend."""
    if chunk_bytes is not None:
        return int(chunk_bytes)
    return DEFAULT_CUDA_CHUNK_BYTES if jax.default_backend() == "gpu" else DEFAULT_CHUNK_BYTES


def _gpu_backend() -> bool:
    try:
        return len(jax.devices("cuda")) > 0
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def _register() -> tuple:
    """Loads the libraries and registers every target; returns the platforms."""
    platforms = [("cpu", ctypes.cdll.LoadLibrary(str(cpu_library())))]
    cuda = cuda_library()
    if cuda is not None and _gpu_backend():
        platforms.append(("CUDA", ctypes.cdll.LoadLibrary(str(cuda))))
    for platform, lib in platforms:
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform=platform)
    return tuple(p for p, _ in platforms)


def has_cuda() -> bool:
    """True when the CUDA handlers are built and a CUDA backend is present."""
    return "CUDA" in _register()


def _call(name, results, **attrs):
    _register()
    return functools.partial(jax.ffi.ffi_call(name, results, vmap_method="sequential"), **attrs)
