"""Builds kto_torch against the torch already installed:

    pip install --no-build-isolation ./examples/pytorch

The flags are portable by default; KTO_NATIVE=1 adds -march=native (the
project's own .venv is built that way by scripts/python_env.sh: its CPU path
vectorises for the machine it runs on). With nvcc present (CUDA_HOME) and a
CUDA build of torch, the CUDA kernels are compiled in too (for KTO_CUDA_ARCHS,
default "80;90"); KTO_TORCH_CUDA=0 skips them. Eigen's headers come from
$KTO_EIGEN_DIR, else `pkg-config --cflags eigen3`, else /usr/include/eigen3.
The version is the library's, read from include/kto/config.hpp.
"""

import os
import re
import shlex
import subprocess
from pathlib import Path

from setuptools import setup
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def library_version() -> str:
    text = (ROOT / "include" / "kto" / "config.hpp").read_text()
    parts = [re.search(rf"#define KTO_VERSION_{k} (\d+)", text).group(1)
             for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(parts)


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


INCLUDES = [str(ROOT / "include"), str(ROOT / "kernels"), eigen_include()]
CXX_FLAGS = ["-O3", "-std=c++17"]
if os.environ.get("KTO_NATIVE", "0") == "1":
    CXX_FLAGS.append("-march=native")

with_cuda = (
    os.environ.get("KTO_TORCH_CUDA", "1") != "0"
    and cpp_extension.CUDA_HOME is not None
    and __import__("torch").version.cuda is not None
)

if with_cuda:
    archs = os.environ.get("KTO_CUDA_ARCHS", "80;90").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    extension = cpp_extension.CUDAExtension(
        "kto_torch._C",
        ["csrc/kto_torch.cpp", "csrc/kto_torch_cuda.cu"],
        include_dirs=INCLUDES,
        define_macros=[("KTO_TORCH_WITH_CUDA", "1")],
        libraries=["cublas"],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-std=c++17", *gencode]},
    )
else:
    extension = cpp_extension.CppExtension(
        "kto_torch._C", ["csrc/kto_torch.cpp"], include_dirs=INCLUDES,
        extra_compile_args=CXX_FLAGS)

setup(
    version=library_version(),
    packages=["kto_torch"],
    ext_modules=[extension],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
