"""Builds kto_torch against the torch already installed (README.md, "Install"):

    pip install --no-build-isolation ./python/kto_torch      # or: python -m build --no-isolation

The build runs in a temporary copy of this directory (_kto_build_backend.py): nothing is
written into the source tree, and the sdist carries the library's headers (kto_src/).

- The kto headers: the repository's include/ and kernels/, else the sdist's kto_src/.
- The C++ standard is the oldest that the installed torch's headers accept: C++17 (torch
  2.11 and older), or C++20 where torch/all.h says `#error C++20 or later ...` (torch
  2.15); found by preprocessing that header (a second or two), for g++ and nvcc alike.
- Eigen 3.4: $KTO_EIGEN_DIR, else the cmeel-eigen package (pip install cmeel-eigen),
  else `pkg-config eigen3`, else /usr/include/eigen3 (Debian's libeigen3-dev); none of
  them is an error that says how to get it.
- Runtime ISA dispatch: `_C` is built for the baseline x86-64 (SSE2; it also holds the
  CUDA ops), and on x86-64 a CPU-only copy of the ops per level in isa_levels():
  `_C_x86_64_v3` (AVX2 + FMA) and `_C_x86_64_v4` (AVX-512), each with hidden symbols
  bound within itself. kto_torch/_isa.py loads the best one the CPU runs.
  KTO_ISA_LEVELS overrides the list ("" for none). KTO_NATIVE=1 instead builds one `_C`
  for -march=native (the project's own .venv is built that way by scripts/python_env.sh;
  wrong for a wheel that travels). No debug information (-g0).
- With nvcc present (CUDA_HOME) and a CUDA build of torch, the CUDA kernels are compiled
  in too, for KTO_CUDA_ARCHS (default "80;90", `;`-separated compute capabilities);
  KTO_TORCH_CUDA=0 skips them.

The version is the library's, read from include/kto/config.hpp.
"""

import os
import platform
import re
import shlex
import subprocess
from pathlib import Path

from setuptools import setup
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
BUNDLE = "kto_src"  # where the sdist (and the build's temporary copy) holds the headers


def kto_root() -> Path:
    """The directory holding the library's include/ and kernels/: the repository, else
    the sdist's bundle."""
    for root in (HERE.parent.parent, HERE / BUNDLE):
        if (root / "include" / "kto" / "config.hpp").is_file():
            return root
    raise SystemExit(f"kto_torch: the kto headers are missing: neither {HERE.parent.parent} "
                     f"(a repository checkout) nor {HERE / BUNDLE} (an sdist) holds "
                     "include/kto/config.hpp")


ROOT = kto_root()


def library_version() -> str:
    text = (ROOT / "include" / "kto" / "config.hpp").read_text()
    parts = [re.search(rf"#define KTO_VERSION_{k} (\d+)", text).group(1)
             for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(parts)


EIGEN_HELP = ("Eigen 3.4's headers are needed to build kto. Get them with one of\n"
              "  pip install cmeel-eigen              (then build without isolation)\n"
              "  apt-get install libeigen3-dev        (Debian, Ubuntu)\n"
              "  KTO_EIGEN_DIR=/path/to/eigen3        (the directory that holds Eigen/Core)")


def eigen_version(directory: Path) -> tuple[int, int, int] | None:
    macros = directory / "Eigen" / "src" / "Core" / "util" / "Macros.h"
    try:
        text = macros.read_text()
    except OSError:
        return None
    found = [re.search(rf"#define EIGEN_{k}_VERSION (\d+)", text) for k in
             ("WORLD", "MAJOR", "MINOR")]
    return tuple(int(m.group(1)) for m in found) if all(found) else None


def eigen_candidates():
    """(where it came from, directory), in the order they are tried."""
    if os.environ.get("KTO_EIGEN_DIR"):
        yield "KTO_EIGEN_DIR", Path(os.environ["KTO_EIGEN_DIR"])
        return
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            yield "the cmeel-eigen package", Path(distribution("cmeel-eigen").locate_file(
                "cmeel.prefix/include/eigen3"))
        except PackageNotFoundError:
            pass
    except ImportError:
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


def eigen_include() -> str:
    tried = []
    for origin, directory in eigen_candidates():
        if (directory / "Eigen" / "Core").is_file():
            version = eigen_version(directory)
            if version is not None and version[:2] < (3, 4):
                raise SystemExit(f"kto_torch: Eigen {'.'.join(map(str, version))} in "
                                 f"{directory} ({origin}) is too old: kto needs 3.4.\n"
                                 + EIGEN_HELP)
            return str(directory)
        tried.append(f"{directory} ({origin})")
    raise SystemExit("kto_torch: Eigen not found; looked in " + ", ".join(tried) + ".\n"
                     + EIGEN_HELP)


def cxx_standard() -> str:
    """The oldest of C++17 and C++20 under which the installed torch's umbrella header
    preprocesses: torch/all.h opens with `#error C++NN or later compatible compiler is
    required to use PyTorch` (C++20 from torch 2.15 on)."""
    compiler = os.environ.get("CXX", "c++")
    if hasattr(cpp_extension, "get_cxx_compiler"):
        compiler = cpp_extension.get_cxx_compiler()
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    errors = ""
    for std in ("c++17", "c++20"):
        probe = subprocess.run([compiler, f"-std={std}", "-E", "-x", "c++", *includes, "-",
                                "-o", os.devnull], input="#include <torch/all.h>\n",
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return std
        errors = probe.stderr
    raise SystemExit(f"kto_torch: {compiler} cannot preprocess torch's headers at -std=c++17 or "
                     f"-std=c++20:\n{errors[-3000:]}")


CXX_STD = cxx_standard()
INCLUDES = [str(ROOT / "include"), str(ROOT / "kernels"), eigen_include()]
# -g0: Python's own flags (sysconfig) bring -g, which makes the library 4x larger.
CXX_FLAGS = ["-O3", "-g0", f"-std={CXX_STD}"]
if os.environ.get("KTO_NATIVE", "0") == "1":
    CXX_FLAGS.append("-march=native")



def isa_levels() -> list[str]:
    """The x86-64 levels that get their own CPU copy of the ops: those the compiler knows,
    on an x86-64 build that is not native; KTO_ISA_LEVELS overrides."""
    if os.environ.get("KTO_NATIVE", "0") == "1" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    compiler = os.environ.get("CXX", "c++")
    wanted = os.environ.get("KTO_ISA_LEVELS", "x86-64-v3 x86-64-v4").split()
    unknown = [level for level in wanted if level not in ("x86-64-v3", "x86-64-v4")]
    if unknown:
        raise SystemExit(f"kto_torch: KTO_ISA_LEVELS may name x86-64-v3 and x86-64-v4; got "
                         f"{unknown}")
    return [level for level in wanted if subprocess.run(
        [compiler, f"-march={level}", "-x", "c++", "-E", "-", "-o", os.devnull], input="",
        capture_output=True, text=True).returncode == 0]


LEVELS = isa_levels()
with_cuda = (
    os.environ.get("KTO_TORCH_CUDA", "1") != "0"
    and cpp_extension.CUDA_HOME is not None
    and __import__("torch").version.cuda is not None
)
print(f"kto_torch {library_version()}: -std={CXX_STD}, Eigen {INCLUDES[2]}, "
      f"CUDA {'on' if with_cuda else 'off'}, CPU levels {['baseline', *LEVELS]}", flush=True)

if with_cuda:
    archs = [a for a in os.environ.get("KTO_CUDA_ARCHS", "80;90").split(";") if a]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    extension = cpp_extension.CUDAExtension(
        "kto_torch._C",
        ["csrc/kto_torch.cpp", "csrc/kto_torch_cuda.cu"],
        include_dirs=INCLUDES,
        define_macros=[("KTO_TORCH_WITH_CUDA", "1")],
        libraries=["cublas"],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", f"-std={CXX_STD}", *gencode]},
    )
else:
    extension = cpp_extension.CppExtension(
        "kto_torch._C", ["csrc/kto_torch.cpp"], include_dirs=INCLUDES,
        extra_compile_args=CXX_FLAGS)

# The CPU-only copies of the ops, one per level (runtime ISA dispatch).
variants = [cpp_extension.CppExtension(
    f"kto_torch._C_{level.replace('-', '_')}", [f"csrc/kto_torch_{level.replace('-', '_')}.cpp"],
    include_dirs=INCLUDES,
    extra_compile_args=[*CXX_FLAGS, f"-march={level}", "-fvisibility=hidden"],
    extra_link_args=["-Wl,-Bsymbolic"]) for level in LEVELS]

setup(
    version=library_version(),
    packages=["kto_torch"],
    package_data={"kto_torch": ["py.typed"]},  # PEP 561: the package has inline types
    ext_modules=[extension, *variants],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
