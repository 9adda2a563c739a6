"""bench/compare_fused_torch.py, the GPU peer table's harness, run on the CPU at a small shape:
every peer (kto, TRL 1.16's chunked head, Liger, Cut Cross-Entropy, eager and compiled
PyTorch) is importable and computes the same KTO loss, so that a GPU session measures the
same function for all of them.

Tolerance rule. The peers other than kto round each logit to bf16 on the CPU (unit roundoff
u = 2^-8); that moves a token's log-prob by at most 2·u·max|z| (z the row's logits), a
sequence's by T times that, the log-ratio by twice that (policy and reference), and the loss
(mean of 1 − σ(±β ratio), slope at most β/4) by β/4 times the ratio's shift. kto accumulates
and keeps the logits in fp32: its loss must agree with the fp32-logits loss to 1e-5 (fp32
rounding of T log-probs of magnitude ~log V, times β/4, is under 1e-6 here).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("kto_torch")

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "compare_fused_torch.py"
B, T, D, V, BETA = 4, 4, 32, 300, 0.1


def _harness():
    spec = importlib.util.spec_from_file_location("compare_fused_torch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_peer_computes_the_same_loss(tmp_path):
    out = tmp_path / "peers.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--dims", str(D),
                          "--batch", str(B), "--len", str(T), "--vocab", str(V), "--reps", "1",
                          "--warmup", "0", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["case"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"kto", "trl 1.16 chunked head", "liger", "cut cross-entropy",
                         "torch (materialised logits)", "torch.compile (materialised)"}, \
        run.stdout[-3000:]

    harness = _harness()
    x = harness.make_inputs(B, T, D, V, device="cpu")
    max_z = max(float((h.float().reshape(-1, D) @ w.float().T).abs().max())
                for h, w in ((x["h"], x["w"]), (x["ref_h"], x["ref_w"])))
    exact = harness.fp32_reference_loss(x, beta=BETA)
    bf16_bound = BETA / 4 * 2 * T * 2 * 2.0**-8 * max_z
    for case, row in rows.items():
        bound = 1e-5 if case == "kto" else bf16_bound
        assert abs(row["loss"] - exact) <= bound, (case, row["loss"], exact, bound)
        assert row["loss_error"] == pytest.approx(abs(row["loss"] - exact))


def test_unknown_case_is_refused():
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--cases", "kto,nope"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--cases: unknown ['nope']" in run.stderr
