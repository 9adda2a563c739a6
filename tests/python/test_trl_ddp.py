"""kto_torch.trl.KTOTrainer over two processes (torchrun, gloo; DistributedDataParallel as
accelerate sets it up on the CPU, and DeepSpeed ZeRO-3) against one process over the same
global batch and against TRL 1.16's own KTOTrainer over the same two processes
(tests/python/trl_ddp_worker.py says how the data make those the same step). The fused head
runs inside the wrapper's forward (model(..., kto_head=...)), so DDP's gradient all-reduce
sees it; under ZeRO-3 every parameter is partitioned and the head gathers the lm_head for its
call, as TRL's own head does.

Tolerance rule: every path computes in fp32 from the same weights and tokens; they differ in
the order of fp32 sums only (two half-batch gradients averaged by DDP against one gradient
over the batch; z0's sum over the KL batch split across ranks; TRL's log-prob head against
kto's lse kernel). Loss and metrics within 1e-6 relative (test_trl.py's rule for fp32); every
parameter gradient within 1e-4 of the largest gradient entry of the model (the same rule:
an fp32 change Δρ of a log-ratio moves the per-sequence gradient scale by about β Δρ
relative). Under ZeRO-3 the gradient is read as the parameters' change under SGD at learning
rate 1 (the worker says why), which adds the fp32 roundings of the update and of the
difference, about (|p| + 2|g|) 2^-24, under 1e-6 of the largest gradient here. Faults: one
rank's bad input raises on both ranks, naming the rank and the cause, within the launcher's
timeout (no rank waits in a collective).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("kto_torch.trl")

WORKER = Path(__file__).with_name("trl_ddp_worker.py")
TIMEOUT_S = 240
METRICS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
           "logps/chosen", "logps/rejected", "entropy", "logits/chosen", "logits/rejected",
           "num_tokens")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path_factory, impl: str, processes: int, fault: str = "none",
           strategy: str = "ddp") -> list:
    out = tmp_path_factory.mktemp(f"{impl}_{processes}_{fault}_{strategy}")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
           f"--master_port={_free_port()}", str(WORKER), "--impl", impl, "--out", str(out),
           "--fault", fault, "--strategy", strategy]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    records = []
    for rank in range(processes):
        path = out / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} wrote nothing (rc {run.returncode}):\n" \
                              f"{run.stderr[-3000:]}"
        records.append(torch.load(path, weights_only=False))
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = {(impl, n): launch(tmp_path_factory, impl, n)
            for impl, n in (("default", 2), ("default", 1), ("logits", 2), ("trl", 2))}
    if deepspeed_available():
        for impl in ("default", "trl"):
            runs[(impl, 2, "zero3")] = launch(tmp_path_factory, impl, 2, strategy="zero3")
    return runs


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


needs_deepspeed = pytest.mark.skipif(not deepspeed_available(),
                                     reason="DeepSpeed is not installed (requirements.txt has it)")


def _ok(records):
    for r in records:
        assert "error" not in r, r.get("traceback")
    return records


def assert_same_step(a, b):
    for key in METRICS:
        assert a["log"][key] == pytest.approx(b["log"][key], rel=1e-6, abs=1e-9), key
    assert a["grads"].keys() == b["grads"].keys()
    scale = max(g.abs().max().item() for g in b["grads"].values())
    assert scale > 0
    for name, g in b["grads"].items():
        assert torch.allclose(a["grads"][name], g, rtol=0, atol=1e-4 * scale), name


def test_two_processes_run_the_fused_head_under_ddp(runs):
    for rank, record in enumerate(_ok(runs[("default", 2)])):
        assert record["fused_linear"] is True
        assert record["distributed_type"] == "DistributedType.MULTI_CPU"
        assert record["wrapped"] == "DistributedDataParallel"
        assert record["rank"] == rank and record["world"] == 2
        assert record["log"]["kl"] > 0  # policy != reference: z0 is exercised


def test_ranks_agree(runs):
    r0, r1 = _ok(runs[("default", 2)])
    assert r0["log"] == r1["log"]
    for name, g in r0["grads"].items():
        assert torch.equal(g, r1["grads"][name]), name  # DDP's all-reduced gradient


@pytest.mark.parametrize("other", [("default", 1), ("trl", 2), ("logits", 2)],
                         ids=["one_process", "trl_two_processes", "logits_two_processes"])
def test_two_processes_equal(runs, other):
    ours = _ok(runs[("default", 2)])[0]
    assert_same_step(ours, _ok(runs[other])[0])


@needs_deepspeed
def test_two_processes_run_the_fused_head_under_zero3(runs):
    for rank, record in enumerate(_ok(runs[("default", 2, "zero3")])):
        assert record["fused_linear"] is True
        assert record["distributed_type"] == "DistributedType.DEEPSPEED"
        assert record["wrapped"] == "DeepSpeedEngine"
        assert record["partitioned"] is True  # the lm_head really is sharded over the ranks
        assert record["rank"] == rank and record["world"] == 2
    r0, r1 = runs[("default", 2, "zero3")]
    assert r0["log"] == r1["log"]


@needs_deepspeed
@pytest.mark.parametrize("other", [("default", 1), ("default", 2), ("trl", 2, "zero3")],
                         ids=["one_process", "ddp_two_processes", "trl_zero3"])
def test_zero3_equals(runs, other):
    ours = _ok(runs[("default", 2, "zero3")])[0]
    assert_same_step(ours, _ok(runs[other])[0])


FAULTS = [("nan_kl", "NonFiniteModelOutputError", "the policy's forward on the KL batch"),
          ("bad_target", "IndexError", "the batch check")]


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("zero3", marks=needs_deepspeed)])
@pytest.mark.parametrize("fault,cause,stage", FAULTS)
def test_one_rank_fails_every_rank_raises(tmp_path_factory, fault, cause, stage, strategy):
    records = launch(tmp_path_factory, "default", 2, fault, strategy)
    for record in records:
        assert record.get("error_type") == "PeerError", record.get("traceback")
        message = record["error"]
        assert message.startswith("kto_torch.trl.KTOTrainer: 1 of 2 data-parallel rank(s) "
                                  "failed before the KL all-reduce"), message
        assert f"rank 1: {cause}" in message, message
        assert f"in {stage}" in message, message
        assert "rank 0:" not in message
