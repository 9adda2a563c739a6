"""Builds kto_torch against the torch already installed:

    pip install --no-build-isolation ./examples/pytorch

With nvcc present (CUDA_HOME) and a CUDA build of torch, the CUDA kernels are
compiled in too (for KTO_CUDA_ARCHS, default "80;90"); KTO_TORCH_CUDA=0 skips
them. Eigen's headers come from /usr/include/eigen3 or $KTO_EIGEN_DIR.
"""

import os
from pathlib import Path

from setuptools import setup
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
INCLUDES = [str(ROOT / "include"), str(ROOT / "kernels"),
            os.environ.get("KTO_EIGEN_DIR", "/usr/include/eigen3")]
CXX_FLAGS = ["-O3", "-march=native", "-std=c++17"]

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
    name="kto_torch",
    version="0.1.0",
    description="KTO loss ops for PyTorch, backed by the kto C++ library",
    packages=["kto_torch"],
    ext_modules=[extension],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
