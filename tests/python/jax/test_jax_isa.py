"""Runtime ISA dispatch for kto_jax (issue 23, item 3): the CPU handlers' library is built
for the baseline and once per x86-64 level (a portable install), and the best copy the
CPU runs is loaded; a KTO_JAX_NATIVE=1 install has one. Checked as for kto_torch
(test_torch_isa.py): build_info() reports the choice; each copy the CPU runs, forced with
KTO_CPU_ISA in a fresh process, is that copy and gives per-sequence log-probs equal to a
float64 reference under the fp32 rule (kto_reference.py); an unbuilt copy is refused.
"""

import json

import pytest

pytest.importorskip("jax")
kto_jax = pytest.importorskip("kto_jax")

from isa_support import LEVELS, rank, run_probe, runnable  # noqa: E402
from kto_reference import RTOL_FP32  # noqa: E402

INFO = kto_jax.build_info()
RUNNABLE = runnable(INFO)

_PROBE = r"""
import json
import numpy as np
import kto_jax
rng = np.random.default_rng(0)
N, V = 9, 300
z = (3 * rng.standard_normal((N, V))).astype(np.float32)
z[1, 5] = -np.inf
targets = rng.integers(0, V, N).astype(np.int32)
offsets = np.array([0, 4, 9], np.int32)
logp, n = kto_jax.sequence_logprobs(z, targets, offsets)
z64 = z.astype(np.float64)
m = z64.max(-1, keepdims=True)
lse = (m + np.log(np.exp(z64 - m).sum(-1, keepdims=True)))[:, 0]
lp = z64[np.arange(N), targets] - lse
want = [lp[0:4].sum(), lp[4:9].sum()]
scale = [float((abs(lp) + abs(lse))[a:b].sum()) for a, b in ((0, 4), (4, 9))]
print(json.dumps({"isa": kto_jax.build_info()["dispatched_isa"],
                  "got": [float(x) for x in logp], "want": want, "scale": scale}))
"""


def probe(level):
    return run_probe(_PROBE, level)


def test_build_info_reports_the_choice():
    for key in ("dispatched_isa", "built_isas", "cpu_isa", "eigen_version", "eigen_simd",
                "threads", "cuda_handlers", "jax"):
        assert key in INFO, key
    assert INFO["dispatched_isa"] in INFO["built_isas"]
    if INFO["cpu_isa"] in LEVELS:
        assert INFO["dispatched_isa"] == max(RUNNABLE, key=rank)


@pytest.mark.parametrize("level", RUNNABLE)
def test_each_copy_is_what_it_says_and_right(level):
    done = probe(level)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["isa"] == level
    for g, w, s in zip(got["got"], got["want"], got["scale"], strict=True):
        assert abs(g - w) <= RTOL_FP32 * max(abs(w), s)


def test_a_copy_not_built_is_refused():
    done = probe("x86-64-v9")
    assert done.returncode != 0
    assert "KTO_CPU_ISA='x86-64-v9' was not built" in done.stderr
