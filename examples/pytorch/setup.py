"""Builds kto_torch against the torch already installed:

    pip install --no-build-isolation ./examples/pytorch
"""

from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

setup(
    name="kto_torch",
    version="0.1.0",
    description="KTO loss ops for PyTorch, backed by the kto C++ library",
    packages=["kto_torch"],
    ext_modules=[
        CppExtension(
            "kto_torch._C",
            ["csrc/kto_torch.cpp"],
            include_dirs=[str(ROOT / "include"), "/usr/include/eigen3"],
            extra_compile_args=["-O3", "-march=native", "-std=c++17"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
