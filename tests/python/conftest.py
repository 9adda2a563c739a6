import sys
from pathlib import Path

# The JAX bindings and the TRL example live with the examples; make them
# importable in the tests (kto_torch itself is the installed extension).
_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(_EXAMPLES / "jax"))
sys.path.insert(0, str(_EXAMPLES / "trl"))
