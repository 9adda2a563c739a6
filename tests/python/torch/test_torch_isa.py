"""Runtime ISA dispatch (issue 23, item 3): kto_torch carries its CPU ops once per x86-64
level (a portable install: ``_C`` for the baseline, ``_C_x86_64_v3``, ``_C_x86_64_v4``) and
loads the best copy this CPU runs; a KTO_NATIVE=1 install (the project's .venv) has one.

Checked: build_info() reports what was built and chosen; the choice is the highest built
level the CPU runs; each copy the CPU runs, forced with KTO_CPU_ISA in a fresh process,
really is that copy (its compiled_isa) and gives the loss and the gradient of a float64
reference under the fp32 rule of kto_reference.py; a copy that was not built, or that the
CPU cannot run, is refused by name.
"""

import json

import pytest

torch = pytest.importorskip("torch")
kto_torch = pytest.importorskip("kto_torch")

from isa_support import LEVELS, rank, run_probe, runnable  # noqa: E402
from kto_reference import RTOL_FP32  # noqa: E402

INFO = kto_torch.build_info()
RUNNABLE = runnable(INFO)

# One process per copy: the loss and the logits' gradient of a fixed problem, and the
# float64 reference of the same problem (-log softmax summed over the scored tokens).
_PROBE = r"""
import json, torch, kto_torch
g = torch.Generator().manual_seed(0)
B, T, V = 3, 7, 300
logits = (3 * torch.randn(B, T, V, generator=g))
logits[0, 1, 5] = float("-inf")
labels = torch.randint(0, V, (B, T), generator=g)
labels[:, :2] = -100
ref = torch.tensor([-40.0, -35.0, -45.0])
desirable = torch.tensor([True, False, True])
z = logits.clone().requires_grad_(True)
out = kto_torch.kto_loss(z, labels, None, ref, desirable, reference_point="zero", beta=0.1)
out.loss.backward()
z64 = logits.double().requires_grad_(True)
lp = torch.log_softmax(z64, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
logp = (lp * (labels != -100)).sum(-1)
u = 0.1 * (logp - ref.double())
loss64 = torch.where(desirable, 1 - torch.sigmoid(u), 1 - torch.sigmoid(-u)).mean()
loss64.backward()
lse = z64.detach().logsumexp(-1)
scored = labels != -100
# The rule's scales (kto_reference.py, as tests/cpp/support.hpp): a sequence's log-prob is
# computed from sum |l_r| + |lse_r| over its scored rows; the loss moves by at most
# beta/4 (the sigmoid's slope) times that; a gradient element's is |g_s|(1 + |lse_r|)
# with |g_s| <= beta / (4 B).
seq_scale = ((lp.detach().abs() + lse.abs()) * scored).sum(-1)
print(json.dumps({"isa": kto_torch.build_info()["dispatched_isa"],
                  "loss": float(out.loss), "want": float(loss64),
                  "scale": 0.1 / 4 * float(seq_scale.max()),
                  "grad_err": float((z.grad.double() - z64.grad).abs().max()),
                  "grad_scale": 0.1 / (4 * B) * (1 + float(lse[scored].abs().max()))}))
"""


def probe(level):
    return run_probe(_PROBE, level)


def test_build_info_reports_the_choice():
    for key in ("compiled_isa", "dispatched_isa", "built_isas", "cpu_isa", "eigen_version",
                "eigen_simd", "threads", "cuda_runtime", "torch"):
        assert key in INFO, key
    assert INFO["dispatched_isa"] in INFO["built_isas"]
    if INFO["cpu_isa"] in LEVELS:  # x86-64: the highest built level the CPU runs
        assert INFO["dispatched_isa"] == max(RUNNABLE, key=rank)
    assert INFO["threads"] == torch.get_num_threads()


@pytest.mark.parametrize("level", RUNNABLE)
def test_each_copy_is_what_it_says_and_right(level):
    done = probe(level)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["isa"] == level
    assert abs(got["loss"] - got["want"]) <= RTOL_FP32 * max(abs(got["want"]), got["scale"])
    assert got["grad_err"] <= RTOL_FP32 * got["grad_scale"]


def test_a_copy_not_built_or_not_runnable_is_refused():
    missing = next((level for level in ("x86-64-v4", "x86-64-v3")
                    if level not in INFO["built_isas"]), None)
    if missing is not None:
        done = probe(missing)
        assert done.returncode != 0
        assert f"KTO_CPU_ISA={missing!r} was not built" in done.stderr
    beyond = [level for level in INFO["built_isas"] if rank(level) > rank(INFO["cpu_isa"])]
    if beyond:
        done = probe(beyond[0])
        assert done.returncode != 0
        assert "needs a CPU this one is not" in done.stderr
    done = probe("x86-64-v9")
    assert done.returncode != 0 and "KTO_CPU_ISA='x86-64-v9' was not built" in done.stderr
