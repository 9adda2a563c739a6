"""Builds kto_jax's XLA FFI libraries at install time (never at import; README.md,
"Install"):

    pip install --no-build-isolation ./python/kto_jax      # or: python -m build --no-isolation

setuptools, with a build_ext that runs g++ (and nvcc where present) directly:
the libraries are plain shared objects loaded through ctypes, not Python
extension modules, and need no CMake or extra build dependency. Flags, the C++
standard, Eigen, jaxlib's FFI headers and the opt-in variables (KTO_JAX_NATIVE,
KTO_JAX_CUDA, KTO_CUDA_ARCHS, KTO_EIGEN_DIR) are in kto_jax/_build.py.
--no-build-isolation: the FFI headers must come from the jaxlib that will load the
library. The build runs in a temporary copy of this directory
(_kto_build_backend.py): nothing is written into the source tree, and the sdist
carries the library's headers (kto_src/).
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
try:
    print(f"kto_jax {build.library_version()}: -std={build.cxx_standard()}, "
          f"Eigen {build.eigen_include()}, CUDA {'on' if build.nvcc() else 'off'}, "
          f"CPU levels {['baseline', *build.isa_levels()]}", flush=True)
except build.BuildError as e:
    raise SystemExit(str(e)) from None


class BuildFFI(build_ext):
    """Compiles each library with its own command (kto_jax/_build.py)."""

    def build_extension(self, ext):
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        if ext.name.endswith("_cuda"):
            cmd = build.cuda_command(out, build.nvcc())
        else:
            cmd = build.cpu_command(out, level=LEVELS.get(ext.name))
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


# Runtime ISA dispatch: one CPU library per x86-64 level (kto_jax/_build.py, isa_levels()).
LEVELS = {f"kto_jax._kto_jax_cpu_{level.replace('-', '_')}": level for level in build.isa_levels()}
extensions = [Extension(name, sources=["csrc/kto_jax_cpu.cpp"])
              for name in ("kto_jax._kto_jax_cpu", *LEVELS)]
if build.nvcc() and build.CUDA_SOURCE.exists():
    extensions.append(Extension("kto_jax._kto_jax_cuda", sources=["csrc/kto_jax_cuda.cu"]))

setup(
    version=build.library_version(),
    packages=["kto_jax"],
    package_data={"kto_jax": ["py.typed"]},  # PEP 561: the package has inline types
    ext_modules=extensions,
    cmdclass={"build_ext": BuildFFI},
)
