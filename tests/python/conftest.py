import importlib.util
import os
import sys
from pathlib import Path

# Four CPU devices for the jax.sharding tests (tests/python/jax/test_jax_sharding.py). Set
# before anything imports jax; a caller's own XLA_FLAGS wins.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

# The TRL example lives with the examples; make it importable in the tests
# (kto_torch itself is the installed extension). kto_jax is the installed package
# (pip install --no-build-isolation ./python/kto_jax); where it is not installed, the
# source tree's package is used and compiles its CPU library on first use.
_REPOSITORY = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("kto_jax") is None:
    sys.path.insert(0, str(_REPOSITORY / "python" / "kto_jax"))
sys.path.insert(0, str(_REPOSITORY / "examples" / "trl"))
# The tests live in torch/, jax/ and trl/ beside this file; what they share
# (kto_reference, isa_support) lives here.
sys.path.insert(0, str(Path(__file__).resolve().parent))
