"""How kto_jax's XLA FFI libraries are compiled: one place for setup.py (the
install-time build) and for the source-tree fallback of kto_jax/__init__.py.

No jax import at module level: setup.py loads this file by path.

Flags are portable by default; KTO_JAX_NATIVE=1 adds -march=native (faster on
the machine that builds, wrong for a wheel that travels). Eigen's headers come
from $KTO_EIGEN_DIR, else `pkg-config --cflags-only-I eigen3`, else
/usr/include/eigen3; XLA's FFI headers from jaxlib (jax.ffi.include_dir()); the
library's from the repository's include/ and kernels/. The CUDA library needs
nvcc ($CUDA_HOME/bin or PATH); KTO_JAX_CUDA=0 skips it, KTO_CUDA_ARCHS
(default "80;90") picks the architectures.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SOURCE = PACKAGE.parent  # examples/jax
ROOT = SOURCE.parent.parent  # the repository
CPU_SOURCE = SOURCE / "csrc" / "kto_jax_cpu.cpp"
CUDA_SOURCE = SOURCE / "csrc" / "kto_jax_cuda.cu"


def library_version(root: Path = ROOT) -> str:
    text = (root / "include" / "kto" / "config.hpp").read_text()
    return ".".join(
        re.search(rf"#define KTO_VERSION_{k} (\d+)", text).group(1)
        for k in ("MAJOR", "MINOR", "PATCH")
    )


def eigen_include() -> str:
    if os.environ.get("KTO_EIGEN_DIR"):
        return os.environ["KTO_EIGEN_DIR"]
    try:
        flags = subprocess.run(["pkg-config", "--cflags-only-I", "eigen3"], check=True,
                               capture_output=True, text=True).stdout
        dirs = [f[2:] for f in shlex.split(flags) if f.startswith("-I")]
        if dirs:
            return dirs[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    return "/usr/include/eigen3"


def ffi_include() -> str:
    import jax  # noqa: PLC0415 (build time only)

    return str(jax.ffi.include_dir())


def includes(root: Path = ROOT) -> list[str]:
    return [f"-I{root / 'include'}", f"-I{root / 'kernels'}", f"-I{SOURCE / 'csrc'}",
            f"-I{eigen_include()}", "-isystem", ffi_include()]


def native() -> bool:
    return os.environ.get("KTO_JAX_NATIVE", "0") == "1"


def cpu_command(out: Path, root: Path = ROOT) -> list[str]:
    cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-O3", "-shared", "-fPIC", "-pthread"]
    if native():
        cmd.append("-march=native")
    return [*cmd, *includes(root), str(CPU_SOURCE), "-o", str(out)]


def nvcc() -> str | None:
    if os.environ.get("KTO_JAX_CUDA", "1") == "0":
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def cuda_command(out: Path, compiler: str, root: Path = ROOT) -> list[str]:
    archs = os.environ.get("KTO_CUDA_ARCHS", "80;90").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    host = ["-O3", "-fPIC", "-pthread"] + (["-march=native"] if native() else [])
    return [compiler, "-std=c++17", "-O3", "-shared", "--expt-relaxed-constexpr",
            "-Xcompiler", ",".join(host), *gencode, *includes(root), str(CUDA_SOURCE),
            "-o", str(out), "-lcublas"]


def build_in_source_tree(build_dir: Path) -> Path:
    """The fallback when kto_jax is not installed: compiles the CPU library into
    build_dir unless an up-to-date one is there. Returns its path."""
    out = build_dir / "libkto_jax_cpu.so"
    deps = [CPU_SOURCE, *CPU_SOURCE.parent.glob("*.hpp"), *(ROOT / "include").rglob("*.hpp")]
    newest = max(p.stat().st_mtime for p in deps)
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    subprocess.run(cpu_command(tmp), check=True)
    tmp.replace(out)
    return out
