"""The package's PEP 517 build backend: setuptools, run in a temporary copy.

Every hook that pip or `python -m build` calls (requirements, metadata, wheel, sdist)
copies this directory into a temporary one and runs setuptools.build_meta there, so
that building never writes into the source tree (no build/, no *.egg-info). In the
repository the copy also gets the kto library's headers (include/ and kernels/ of the
repository root) and LICENSE under kto_src/, which is what the sdist carries: a wheel
builds from the sdist alone. Editable installs build in place (setuptools' own hooks).

python/kto_jax/_kto_build_backend.py is a symlink to python/kto_torch/_kto_build_backend.py
in the repository; each sdist holds a copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from setuptools import build_meta as _setuptools

# abspath, not resolve(): python/kto_jax's backend is a symlink to this file, and HERE must
# be the package that is being built.
HERE = Path(os.path.abspath(__file__)).parent
REPOSITORY = HERE.parent.parent
BUNDLE = "kto_src"  # include/, kernels/ and LICENSE of the library, in the copy and the sdist
_IGNORE = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "*.so",
                                 ".pytest_cache")


def library_in_repository() -> bool:
    return (REPOSITORY / "include" / "kto" / "config.hpp").is_file()


@contextlib.contextmanager
def _staged():
    """A temporary copy of this directory, with the library bundled, as the working
    directory for the duration."""
    with tempfile.TemporaryDirectory(prefix=f"{HERE.name}-build-") as tmp:
        stage = Path(tmp) / HERE.name
        shutil.copytree(HERE, stage, ignore=_IGNORE)
        if not (stage / BUNDLE / "include" / "kto" / "config.hpp").is_file():
            if not library_in_repository():
                raise RuntimeError(
                    f"kto build: the kto headers are neither in {HERE / BUNDLE} (an sdist) "
                    f"nor in {REPOSITORY / 'include'} (the repository checkout)")
            shutil.rmtree(stage / BUNDLE, ignore_errors=True)
            for part in ("include", "kernels"):
                shutil.copytree(REPOSITORY / part, stage / BUNDLE / part, ignore=_IGNORE)
            shutil.copy2(REPOSITORY / "LICENSE", stage / BUNDLE / "LICENSE")
        if not (stage / "LICENSE").exists():
            shutil.copy2(stage / BUNDLE / "LICENSE", stage / "LICENSE")
        cwd = os.getcwd()
        os.chdir(stage)
        try:
            yield
        finally:
            os.chdir(cwd)


def _absolute(path):
    return None if path is None else os.path.abspath(path)


def get_requires_for_build_wheel(config_settings=None):
    with _staged():
        return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    with _staged():
        return _setuptools.get_requires_for_build_sdist(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    metadata_directory = _absolute(metadata_directory)
    with _staged():
        return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    wheel_directory, metadata_directory = _absolute(wheel_directory), _absolute(metadata_directory)
    with _staged():
        return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    sdist_directory = _absolute(sdist_directory)
    with _staged():
        return _setuptools.build_sdist(sdist_directory, config_settings)


# Editable installs point at the source tree, so they build there.
if hasattr(_setuptools, "build_editable"):
    get_requires_for_build_editable = _setuptools.get_requires_for_build_editable
    prepare_metadata_for_build_editable = _setuptools.prepare_metadata_for_build_editable
    build_editable = _setuptools.build_editable
