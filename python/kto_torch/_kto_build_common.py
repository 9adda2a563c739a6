"""What building either of kto's Python packages needs, written once: kto_torch's setup.py
and kto_jax's kto_jax/_build.py load this file by path (python/kto_jax/kto_jax/_build_common.py
is a symlink to it in the repository; each sdist holds a copy).

- The kto headers: the repository's include/ and kernels/, else an sdist's kto_src/
  (bundled by _kto_build_backend.py).
- The library's version, from include/kto/config.hpp (its one place).
- Eigen 3.4: $KTO_EIGEN_DIR, else the cmeel-eigen package (pip install cmeel-eigen), else
  `pkg-config eigen3`, else /usr/include/eigen3 (Debian's libeigen3-dev); none of them is
  an error that says how to get it.
- The C++ standard: the oldest of C++17 and C++20 under which a framework's header compiles
  (torch 2.15 and newer jaxlibs need C++20), found by a compile probe.
- Runtime ISA dispatch: the x86-64 levels that get their own CPU copy of the ops
  (x86-64-v3: AVX2 + FMA; x86-64-v4: AVX-512), those the compiler knows; KTO_ISA_LEVELS
  overrides the list ("" for none). None on a native build or off x86-64.
- CUDA: KTO_CUDA_ARCHS (default "80;90", `;`-separated compute capabilities).

No import beyond the standard library: it runs before the package exists.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
from pathlib import Path

BUNDLE = "kto_src"  # where an sdist (and the build's temporary copy) holds the headers
ISA_LEVELS = ("x86-64-v3", "x86-64-v4")

EIGEN_HELP = ("Eigen 3.4's headers are needed to build kto. Get them with one of\n"
              "  pip install cmeel-eigen              (then build without isolation)\n"
              "  apt-get install libeigen3-dev        (Debian, Ubuntu)\n"
              "  KTO_EIGEN_DIR=/path/to/eigen3        (the directory that holds Eigen/Core)")


class BuildError(RuntimeError):
    """Something the build needs is missing or wrong; the message says what and how to fix
    it, naming the package."""


class EigenNotFound(BuildError):
    pass


def kto_root(source: Path, package: str) -> Path:
    """The directory holding the library's include/ and kernels/ for the package whose
    source directory is `source` (python/<package>, an unpacked sdist or the build's copy):
    the repository, else the sdist's bundle."""
    for root in (source.parent.parent, source / BUNDLE):
        if (root / "include" / "kto" / "config.hpp").is_file():
            return root
    raise BuildError(f"{package}: the kto headers are missing: neither {source.parent.parent} "
                     f"(a repository checkout) nor {source / BUNDLE} (an sdist) holds "
                     "include/kto/config.hpp")


def library_version(root: Path) -> str:
    text = (root / "include" / "kto" / "config.hpp").read_text()
    return ".".join(re.search(rf"#define KTO_VERSION_{k} (\d+)", text).group(1)
                    for k in ("MAJOR", "MINOR", "PATCH"))


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
    from importlib.metadata import PackageNotFoundError, distribution

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


def eigen_include(package: str) -> str:
    """The first Eigen 3.4 (or newer) of eigen_candidates(); an older one is an error."""
    tried = []
    for origin, directory in eigen_candidates():
        if (directory / "Eigen" / "Core").is_file():
            version = eigen_version(directory)
            if version is not None and version[:2] < (3, 4):
                raise EigenNotFound(f"{package}: Eigen {'.'.join(map(str, version))} in "
                                    f"{directory} ({origin}) is too old: kto needs 3.4.\n"
                                    + EIGEN_HELP)
            return str(directory)
        tried.append(f"{directory} ({origin})")
    raise EigenNotFound(f"{package}: Eigen not found; looked in " + ", ".join(tried) + ".\n"
                        + EIGEN_HELP)


def oldest_standard(compiler: str, flags: list[str], header: str, package: str,
                    preprocess_only: bool = False) -> str:
    """The oldest of c++17 and c++20 under which `#include <header>` compiles (syntax only;
    or, for a header that says `#error C++NN or later` as torch/all.h does, preprocesses:
    faster) with `flags` (the framework's include directories)."""
    mode = ["-E", "-o", os.devnull] if preprocess_only else ["-fsyntax-only"]
    errors = ""
    for std in ("c++17", "c++20"):
        probe = subprocess.run([compiler, f"-std={std}", *mode, "-x", "c++", *flags, "-"],
                               input=f"#include <{header}>\n", capture_output=True, text=True)
        if probe.returncode == 0:
            return std
        errors = probe.stderr
    verb = "preprocess" if preprocess_only else "compile"
    raise BuildError(f"{package}: {compiler} cannot {verb} {header} at -std=c++17 or "
                     f"-std=c++20:\n{errors[-3000:]}")


def isa_levels(compiler: str, native: bool, package: str) -> list[str]:
    """The x86-64 levels that get their own CPU copy of the ops: those the compiler knows,
    on an x86-64 build that is not native; KTO_ISA_LEVELS overrides."""
    if native or platform.machine() not in ("x86_64", "AMD64"):
        return []
    wanted = os.environ.get("KTO_ISA_LEVELS", " ".join(ISA_LEVELS)).split()
    unknown = [level for level in wanted if level not in ISA_LEVELS]
    if unknown:
        raise BuildError(f"{package}: KTO_ISA_LEVELS may name {' and '.join(ISA_LEVELS)}; "
                         f"got {unknown}")
    return [level for level in wanted if subprocess.run(
        [compiler, f"-march={level}", "-x", "c++", "-E", "-", "-o", os.devnull], input="",
        capture_output=True, text=True).returncode == 0]


def cuda_gencode() -> list[str]:
    """nvcc's -gencode flags for KTO_CUDA_ARCHS."""
    archs = [a for a in os.environ.get("KTO_CUDA_ARCHS", "80;90").split(";") if a]
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
