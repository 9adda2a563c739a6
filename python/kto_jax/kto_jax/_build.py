"""How kto_jax's XLA FFI libraries are compiled: one place for setup.py (the
install-time build) and for the source-tree fallback of kto_jax/_library.py. What it
shares with kto_torch's build (the headers, the version, Eigen, the C++ standard probe,
the ISA levels, the CUDA architectures) is _build_common.py.

No jax import at module level: setup.py loads this file by path.

- The kto headers: the repository's include/ and kernels/, else an sdist's kto_src/
  (bundled by _kto_build_backend.py, which also runs every build in a temporary copy,
  so that nothing is written into the source tree).
- XLA's FFI headers: jaxlib's (jax.ffi.include_dir()).
- The C++ standard: C++17, or C++20 where jaxlib's FFI header needs it (a compile
  probe of xla/ffi/api/ffi.h, a second); g++ and nvcc alike.
- Eigen 3.4: $KTO_EIGEN_DIR, else the cmeel-eigen package (pip install cmeel-eigen),
  else `pkg-config eigen3`, else /usr/include/eigen3 (Debian's libeigen3-dev); none of
  them is an error that says how to get it.
- Runtime ISA dispatch: the CPU library is built for the baseline and, on x86-64, once
  more per level in isa_levels() (x86-64-v3: AVX2 + FMA; x86-64-v4: AVX-512), each its
  own .so; kto_jax/_library.py loads the best one the CPU runs. KTO_ISA_LEVELS overrides
  the list ("" for none). KTO_JAX_NATIVE=1 instead builds one library for -march=native
  (fastest on the machine that builds, wrong for a wheel that travels).
- The CUDA library needs nvcc ($CUDA_HOME/bin or PATH); KTO_JAX_CUDA=0 skips it,
  KTO_CUDA_ARCHS (default "80;90", `;`-separated compute capabilities) picks the
  architectures.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SOURCE = PACKAGE.parent  # python/kto_jax (or an unpacked sdist, or the build's copy of it)
ROOT = SOURCE.parent.parent  # the repository
CPU_SOURCE = SOURCE / "csrc" / "kto_jax_cpu.cpp"
CUDA_SOURCE = SOURCE / "csrc" / "kto_jax_cuda.cu"
NAME = "kto_jax"

# What both packages' builds share (kto_torch/_kto_build_common.py; a symlink here, a copy in
# an sdist), loaded by path: setup.py loads this file by path too, outside the package.
_spec = importlib.util.spec_from_file_location("kto_jax_build_common",
                                               Path(__file__).parent / "_build_common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)
BuildError = common.BuildError
EigenNotFound = common.EigenNotFound


def kto_root() -> Path:
    """The directory holding the library's include/ and kernels/: the repository, else
    the sdist's bundle."""
    return common.kto_root(SOURCE, NAME)


def library_version(root: Path | None = None) -> str:
    return common.library_version(root or kto_root())


@functools.lru_cache(maxsize=None)
def eigen_include() -> str:
    return common.eigen_include(NAME)


def ffi_include() -> str:
    import jax  # noqa: PLC0415 (build time only)

    return str(jax.ffi.include_dir())


def includes(root: Path | None = None) -> list[str]:
    root = root or kto_root()
    return [f"-I{root / 'include'}", f"-I{root / 'kernels'}", f"-I{SOURCE / 'csrc'}",
            f"-I{eigen_include()}", "-isystem", ffi_include()]


def cxx() -> str:
    return os.environ.get("CXX", "g++")


@functools.lru_cache(maxsize=None)
def cxx_standard() -> str:
    """The oldest of C++17 and C++20 under which jaxlib's FFI header compiles."""
    return common.oldest_standard(cxx(), ["-isystem", ffi_include()], "xla/ffi/api/ffi.h", NAME)


def native() -> bool:
    return os.environ.get("KTO_JAX_NATIVE", "0") == "1"


def isa_levels() -> list[str]:
    """The extra x86-64 levels of the CPU library (runtime ISA dispatch)."""
    return common.isa_levels(cxx(), native(), NAME)


def cpu_command(out: Path, root: Path | None = None, level: str | None = None) -> list[str]:
    """The CPU library's command: for `level` (an x86-64 level; -Bsymbolic binds the
    library's own references within it, so no other copy's code is ever called), else the
    baseline (or -march=native with KTO_JAX_NATIVE=1)."""
    cmd = [cxx(), f"-std={cxx_standard()}", "-O3", "-shared", "-fPIC", "-pthread"]
    if level:
        cmd += [f"-march={level}", "-Wl,-Bsymbolic"]
    elif native():
        cmd.append("-march=native")
    return [*cmd, *includes(root), str(CPU_SOURCE), "-o", str(out)]


def nvcc() -> str | None:
    if os.environ.get("KTO_JAX_CUDA", "1") == "0":
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def cuda_command(out: Path, compiler: str, root: Path | None = None) -> list[str]:
    host = ["-O3", "-fPIC", "-pthread"] + (["-march=native"] if native() else [])
    return [compiler, f"-std={cxx_standard()}", "-O3", "-shared", "--expt-relaxed-constexpr",
            "-Xcompiler", ",".join(host), *common.cuda_gencode(), *includes(root),
            str(CUDA_SOURCE), "-o", str(out), "-lcublas"]


def build_in_source_tree(build_dir: Path) -> Path:
    """The fallback when kto_jax is not installed: compiles the CPU library into
    build_dir unless an up-to-date one is there. Returns its path."""
    out = build_dir / "libkto_jax_cpu.so"
    deps = [CPU_SOURCE, *CPU_SOURCE.parent.glob("*.hpp"), *(kto_root() / "include").rglob("*.hpp")]
    newest = max(p.stat().st_mtime for p in deps)
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    subprocess.run(cpu_command(tmp), check=True)
    tmp.replace(out)
    return out
