"""Builds kto_torch against the torch already installed (README.md, "Install"):

    pip install --no-build-isolation ./python/kto_torch      # or: python -m build --no-isolation

The build runs in a temporary copy of this directory (_kto_build_backend.py): nothing is
written into the source tree, and the sdist carries the library's headers (kto_src/).
What kto_jax's build shares (headers, version, Eigen, C++ standard, ISA levels, CUDA
architectures) is in _kto_build_common.py.

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

import importlib.util
import os
from pathlib import Path

from setuptools import setup
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
# What both packages' builds share: the headers, the version, Eigen, the C++ standard, the
# ISA levels (_kto_build_common.py).
_spec = importlib.util.spec_from_file_location("kto_build_common", HERE / "_kto_build_common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)
PACKAGE = "kto_torch"
NATIVE = os.environ.get("KTO_NATIVE", "0") == "1"


def cxx_compiler() -> str:
    if hasattr(cpp_extension, "get_cxx_compiler"):
        return cpp_extension.get_cxx_compiler()
    return os.environ.get("CXX", "c++")


try:
    ROOT = common.kto_root(HERE, PACKAGE)
    VERSION = common.library_version(ROOT)
    # torch/all.h opens with `#error C++NN or later compatible compiler is required to use
    # PyTorch` (C++20 from torch 2.15 on): preprocessing it is enough, and fast.
    CXX_STD = common.oldest_standard(cxx_compiler(),
                                     [f"-I{p}" for p in cpp_extension.include_paths()],
                                     "torch/all.h", PACKAGE, preprocess_only=True)
    INCLUDES = [str(ROOT / "include"), str(ROOT / "kernels"), common.eigen_include(PACKAGE)]
    LEVELS = common.isa_levels(os.environ.get("CXX", "c++"), NATIVE, PACKAGE)
except common.BuildError as e:
    raise SystemExit(str(e)) from None

# -g0: Python's own flags (sysconfig) bring -g, which makes the library 4x larger.
CXX_FLAGS = ["-O3", "-g0", f"-std={CXX_STD}"]
if NATIVE:
    CXX_FLAGS.append("-march=native")

with_cuda = (
    os.environ.get("KTO_TORCH_CUDA", "1") != "0"
    and cpp_extension.CUDA_HOME is not None
    and __import__("torch").version.cuda is not None
)
print(f"kto_torch {VERSION}: -std={CXX_STD}, Eigen {INCLUDES[2]}, "
      f"CUDA {'on' if with_cuda else 'off'}, CPU levels {['baseline', *LEVELS]}", flush=True)

if with_cuda:
    extension = cpp_extension.CUDAExtension(
        "kto_torch._C",
        ["csrc/kto_torch.cpp", "csrc/kto_torch_cuda.cu"],
        include_dirs=INCLUDES,
        define_macros=[("KTO_TORCH_WITH_CUDA", "1")],
        libraries=["cublas"],
        extra_compile_args={"cxx": CXX_FLAGS,
                            "nvcc": ["-O3", f"-std={CXX_STD}", *common.cuda_gencode()]},
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
    version=VERSION,
    packages=["kto_torch"],
    package_data={"kto_torch": ["py.typed"]},  # PEP 561: the package has inline types
    ext_modules=[extension, *variants],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
