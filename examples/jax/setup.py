"""Builds kto_jax's XLA FFI libraries at install time (never at import):

    pip install --no-build-isolation ./examples/jax

setuptools, with a build_ext that runs g++ (and nvcc where present) directly:
the libraries are plain shared objects loaded through ctypes, not Python
extension modules, and need no CMake or extra build dependency. Flags, Eigen,
jaxlib's FFI headers and the opt-in variables (KTO_JAX_NATIVE, KTO_JAX_CUDA,
KTO_CUDA_ARCHS, KTO_EIGEN_DIR) are in kto_jax/_build.py. --no-build-isolation:
the FFI headers must come from the jaxlib that will load the library.
"""

import importlib.util
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("kto_jax_build", HERE / "kto_jax" / "_build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


class BuildFFI(build_ext):
    """Compiles each library with its own command (kto_jax/_build.py)."""

    def build_extension(self, ext):
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        if ext.name.endswith("_cuda"):
            cmd = build.cuda_command(out, build.nvcc())
        else:
            cmd = build.cpu_command(out)
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


extensions = [Extension("kto_jax._kto_jax_cpu", sources=["csrc/kto_jax_cpu.cpp"])]
if build.nvcc() and build.CUDA_SOURCE.exists():
    extensions.append(Extension("kto_jax._kto_jax_cuda", sources=["csrc/kto_jax_cuda.cu"]))

setup(
    version=build.library_version(),
    packages=["kto_jax"],
    ext_modules=extensions,
    cmdclass={"build_ext": BuildFFI},
)
