"""How kto_jax's XLA FFI libraries are compiled: one place for setup.py (the
install-time build) and for the source-tree fallback of kto_jax/_library.py.

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
import os
import platform
import re
import shlex
import shutil
import subprocess
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SOURCE = PACKAGE.parent  # python/kto_jax (or an unpacked sdist, or the build's copy of it)
ROOT = SOURCE.parent.parent  # the repository
BUNDLE = SOURCE / "kto_src"  # the library's headers in an sdist
CPU_SOURCE = SOURCE / "csrc" / "kto_jax_cpu.cpp"
CUDA_SOURCE = SOURCE / "csrc" / "kto_jax_cuda.cu"


def kto_root() -> Path:
    """The directory holding the library's include/ and kernels/: the repository, else
    the sdist's bundle."""
    for root in (ROOT, BUNDLE):
        if (root / "include" / "kto" / "config.hpp").is_file():
            return root
    raise FileNotFoundError(f"kto_jax: the kto headers are missing: neither {ROOT} (a "
                            f"repository checkout) nor {BUNDLE} (an sdist) holds "
                            "include/kto/config.hpp")


def library_version(root: Path | None = None) -> str:
    text = ((root or kto_root()) / "include" / "kto" / "config.hpp").read_text()
    return ".".join(
        re.search(rf"#define KTO_VERSION_{k} (\d+)", text).group(1)
        for k in ("MAJOR", "MINOR", "PATCH")
    )


EIGEN_HELP = ("Eigen 3.4's headers are needed to build kto. Get them with one of\n"
              "  pip install cmeel-eigen              (then build without isolation)\n"
              "  apt-get install libeigen3-dev        (Debian, Ubuntu)\n"
              "  KTO_EIGEN_DIR=/path/to/eigen3        (the directory that holds Eigen/Core)")


class EigenNotFound(RuntimeError):
    pass


def eigen_version(directory: Path) -> tuple[int, ...] | None:
    try:
        text = (directory / "Eigen" / "src" / "Core" / "util" / "Macros.h").read_text()
    except OSError:
        return None
    found = [re.search(rf"#define EIGEN_{k}_VERSION (\d+)", text)
             for k in ("WORLD", "MAJOR", "MINOR")]
    return tuple(int(m.group(1)) for m in found) if all(found) else None


def eigen_candidates():
    """(where it came from, directory), in the order they are tried."""
    if os.environ.get("KTO_EIGEN_DIR"):
        yield "KTO_EIGEN_DIR", Path(os.environ["KTO_EIGEN_DIR"])
        return
    from importlib.metadata import PackageNotFoundError, distribution  # noqa: PLC0415

    try:
        yield "the cmeel-eigen package", Path(distribution("cmeel-eigen").locate_file(
            "cmeel.prefix/include/eigen3"))
    except PackageNotFoundError:
        pass
    try:
        flags = subprocess.run(["pkg-config", "--cflags-only-I", "eigen3"], check=True,
                               capture_output=True, text=True).stdout
        for f in shlex.split(flags):
            if f.startswith("-I"):
                yield "pkg-config eigen3", Path(f[2:])
    except (OSError, subprocess.CalledProcessError):
        pass
    yield "the system", Path("/usr/include/eigen3")


@functools.lru_cache(maxsize=None)
def eigen_include() -> str:
    tried = []
    for origin, directory in eigen_candidates():
        if (directory / "Eigen" / "Core").is_file():
            version = eigen_version(directory)
            if version is not None and version[:2] < (3, 4):
                raise EigenNotFound(f"kto_jax: Eigen {'.'.join(map(str, version))} in "
                                    f"{directory} ({origin}) is too old: kto needs 3.4.\n"
                                    + EIGEN_HELP)
            return str(directory)
        tried.append(f"{directory} ({origin})")
    raise EigenNotFound("kto_jax: Eigen not found; looked in " + ", ".join(tried) + ".\n"
                        + EIGEN_HELP)


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
    errors = ""
    for std in ("c++17", "c++20"):
        probe = subprocess.run([cxx(), f"-std={std}", "-fsyntax-only", "-x", "c++", "-isystem",
                                ffi_include(), "-"], input='#include "xla/ffi/api/ffi.h"\n',
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return std
        errors = probe.stderr
    raise RuntimeError(f"kto_jax: {cxx()} cannot compile jaxlib's xla/ffi/api/ffi.h at "
                       f"-std=c++17 or -std=c++20:\n{errors[-3000:]}")


def native() -> bool:
    return os.environ.get("KTO_JAX_NATIVE", "0") == "1"


def isa_levels() -> list[str]:
    """The extra x86-64 levels of the CPU library (runtime ISA dispatch): those the
    compiler knows, on an x86-64 build that is not native; KTO_ISA_LEVELS overrides."""
    if native() or platform.machine() not in ("x86_64", "AMD64"):
        return []
    wanted = os.environ.get("KTO_ISA_LEVELS", "x86-64-v3 x86-64-v4").split()
    return [level for level in wanted if subprocess.run(
        [cxx(), f"-march={level}", "-x", "c++", "-E", "-", "-o", os.devnull], input="",
        capture_output=True, text=True).returncode == 0]


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
    archs = os.environ.get("KTO_CUDA_ARCHS", "80;90").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    host = ["-O3", "-fPIC", "-pthread"] + (["-march=native"] if native() else [])
    return [compiler, f"-std={cxx_standard()}", "-O3", "-shared", "--expt-relaxed-constexpr",
            "-Xcompiler", ",".join(host), *gencode, *includes(root), str(CUDA_SOURCE),
            "-o", str(out), "-lcublas"]


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
