"""kto_torch.trl.KTOTrainer over two processes (torchrun, gloo; DistributedDataParallel as
accelerate sets it up on the CPU, and DeepSpeed ZeRO-3) against one process over the same
global batch and against TRL 1.16's own KTOTrainer over the same two processes
(tests/python/trl/trl_ddp_worker.py says how the data make those the same step). The fused head
runs inside the wrapper's forward (model(..., kto_head=...)), so DDP's gradient all-reduce
sees it; under ZeRO-3 every parameter is partitioned and the head gathers the lm_head for its
call, as TRL's own head does.

Tolerance rule (kto_reference's, as test_trl.py): every path computes in fp32 from the same
weights and tokens; they differ in the order of fp32 sums only (two half-batch gradients
averaged by DDP against one gradient over the batch; z0's sum over the KL batch split across
ranks; TRL's log-prob head against kto's lse kernel). The loss and each metric every run logs
are within 1e-5 of the float64 reference of the global batch (kto_reference.trl_reference of
one process's batch, which the worker's data make the same step) times its condition scale;
num_tokens is equal; every parameter gradient of two runs agrees within twice 1e-5 times A_i
(the gradient's scale, from the sequences' per-sequence gradients). Under ZeRO-3 the gradient
is read as the parameters' change under SGD at learning rate 1 (the worker says why), which
adds the fp32 roundings of the update and of the difference, (|p| + 2|g|) 2^-24, for each
side read so. Faults: one rank's bad input raises on both ranks, naming the rank and the
cause, within the launcher's timeout (no rank waits in a collective).
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

import kto_reference as kr  # noqa: E402

WORKER = Path(__file__).with_name("trl_ddp_worker.py")
TIMEOUT_S = 240


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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The float64 reference of the step every run takes (TRL's trainer in this process over
    the worker's models and global batch, in order), with its scales; and the policy's
    parameters, for ZeRO-3's reading of the gradient."""
    import trl

    import trl_ddp_worker as worker

    policy, ref_model = worker.make_models()
    config = trl.KTOConfig(output_dir=str(tmp_path_factory.mktemp("reference")),
                           per_device_train_batch_size=worker.GLOBAL_BATCH, max_steps=1,
                           report_to="none", save_strategy="no", disable_tqdm=True, beta=0.3,
                           bf16=False, train_sampling_strategy="sequential", use_cpu=True)
    trainer = trl.KTOTrainer(model=policy, ref_model=ref_model, args=config,
                             train_dataset=worker.make_dataset(),
                             processing_class=worker.example.make_tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch["label"]) == worker.GLOBAL_BATCH
    out = kr.trl_reference(trainer, batch)
    out.params = {n: p.detach().clone() for n, p in policy.named_parameters()}
    return out


def zero3_rounding(record, reference):
    """SGD at learning rate 1 read back as p − (p − g): (|p| + 2|g|) u per entry."""
    u = kr.unit_roundoff(torch.float32)
    return {n: u * (reference.params[n].abs() + 2 * g.abs()) for n, g in record["grads"].items()}


def assert_same_step(a, b, reference):
    for record in (a, b):
        kr.assert_metrics_by_rule(record["log"], reference, who=record.get("impl", ""))
    assert a["log"]["num_tokens"] == b["log"]["num_tokens"]
    extra = {n: 0.0 for n in b["grads"]}
    for record in (a, b):
        if record.get("strategy") == "zero3":
            extra = {n: extra[n] + e for n, e in zero3_rounding(record, reference).items()}
    kr.assert_gradients_by_rule(a["grads"], b["grads"], reference.grad_scale, extra=extra)


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
def test_two_processes_equal(runs, other, reference):
    ours = _ok(runs[("default", 2)])[0]
    assert_same_step(ours, _ok(runs[other])[0], reference)


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
def test_zero3_equals(runs, other, reference):
    ours = _ok(runs[("default", 2, "zero3")])[0]
    assert_same_step(ours, _ok(runs[other])[0], reference)


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
