import sys
from pathlib import Path

# The bindings live with the examples; make them importable in the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "jax"))
