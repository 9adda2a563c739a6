"""kto_torch.distributed.kto_loss on two gloo processes: a fault on one rank raises a PeerError
on every rank (naming the failing rank and its cause) within a timeout instead of leaving the
other rank waiting in a collective; the healthy step equals one process on the whole batch.

Launch as in test_torch.py's data-parallel test (torch.multiprocessing.spawn, a file
rendezvous). One pair of processes runs every scenario in turn in the same process group (so
a group that saw a PeerError is shown to stay usable); each rank writes what happened to a
file, and the parent joins with a deadline.
"""

import os
import time
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")
kto_torch = pytest.importorskip("kto_torch")

from gloo_ranks import spawn_ranks  # noqa: E402
from test_torch import make_batch  # noqa: E402

WORLD = 2
TIMEOUT_S = 60  # the process group's collective timeout; a scenario must end well before it
FAULTS = ("none", "nan_kl_logp", "bad_target")


def _batch():
    batch = make_batch(21, B=4, T=5, V=13, dtype=torch.float64)
    batch.pop("generator")
    g = torch.Generator().manual_seed(22)
    batch["kl_logits"] = torch.randn(4, 5, 13, generator=g, dtype=torch.float64) * 2
    batch["kl_targets"] = torch.randint(0, 13, (4, 5), generator=g)
    batch["kl_targets"][:, 0] = -100
    batch["ref_logp"] = torch.full((4,), -25.0, dtype=torch.float64)
    batch["kl_ref_logp"] = torch.full((4,), -24.0, dtype=torch.float64)
    return batch


def _scenario(rank, batch, fault):
    import torch.distributed as dist

    import kto_torch.distributed as kto_dist

    per = batch["logits"].shape[0] // WORLD
    sl = slice(rank * per, (rank + 1) * per)
    with torch.no_grad():  # the KL batch's log-probs, as a trainer computes them
        kl_logp, kl_n = kto_torch.sequence_logprobs(batch["kl_logits"][sl],
                                                    batch["kl_targets"][sl])
    targets = batch["targets"][sl].clone()
    if rank == 1 and fault == "nan_kl_logp":
        kl_logp[0] = float("nan")  # rank 1's KL batch: found in its KL partial
    if rank == 1 and fault == "bad_target":
        targets[1, 3] = 13  # out of [0, V): found in the target batch, after the KL all-reduce
    z = batch["logits"][sl].detach().clone().requires_grad_(True)
    record = {"rank": rank}
    start = time.monotonic()
    try:
        out = kto_dist.kto_loss(z, targets, None, batch["ref_logp"][sl], batch["desirable"][sl],
                                kl_logp, batch["kl_ref_logp"][sl], kl_n,
                                mean_denominator=batch["logits"].shape[0])
        out.loss.backward()
        record.update(loss=out.loss.detach(), kl=out.metrics["kl"], grad=z.grad)
    except kto_dist.PeerError as e:
        record.update(error=type(e).__name__, message=str(e), failures=e.failures, phase=e.phase,
                      is_value_error=isinstance(e, ValueError))
    record["seconds"] = time.monotonic() - start
    # The group is still usable after a PeerError: every rank left the step at the same point.
    check = torch.ones(1)
    dist.all_reduce(check)
    record["after"] = float(check)
    return record


def _rank_main(rank, init_file, batch, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S))
    records = {fault: _scenario(rank, batch, fault) for fault in FAULTS}
    torch.save(records, os.path.join(out_dir, f"rank{rank}.pt"))
    # Both ranks leave together: one rank tearing gloo's connections down while the other
    # still uses them aborted a rank once in CI ("terminate called without an active
    # exception", after its records were saved).
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs():
    """{fault: [rank 0's record, rank 1's record]}, and the batch."""
    batch = _batch()
    ranks = spawn_ranks(_rank_main, WORLD, batch, len(FAULTS) * TIMEOUT_S + 60)
    return {fault: [r[fault] for r in ranks] for fault in FAULTS}, batch


def test_healthy_step_equals_one_process(runs):
    results, batch = runs
    ranks = results["none"]
    kl_logp, kl_n = kto_torch.sequence_logprobs(batch["kl_logits"], batch["kl_targets"])
    z = batch["logits"].detach().clone().requires_grad_(True)
    single = kto_torch.kto_loss(z, batch["targets"], None, batch["ref_logp"], batch["desirable"],
                                kl_logp, batch["kl_ref_logp"], kl_n)
    single.loss.backward()
    assert all("error" not in r for r in ranks), [r.get("message") for r in ranks]
    assert abs(sum(float(r["loss"]) for r in ranks) - single.loss.item()) <= 1e-12
    for r in ranks:
        assert abs(float(r["kl"]) - float(single.metrics["kl"])) <= 1e-14
        assert r["after"] == WORLD
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), z.grad, rtol=1e-12, atol=0)


def test_nan_in_one_ranks_kl_batch_raises_on_every_rank(runs):
    for r in runs[0]["nan_kl_logp"]:
        assert r["seconds"] < TIMEOUT_S / 2
        assert r.get("error") == "PeerError" and r["is_value_error"], r
        assert r["phase"] == "before the KL all-reduce"
        assert list(r["failures"]) == [1]
        assert "rank 1: " in r["message"] and "nan" in r["message"].lower()
        assert "kto_torch.distributed.kto_loss: argument 'kl_policy_logp[0]'" in r["message"]
        assert "1 of 2 data-parallel rank(s) failed before the KL all-reduce" in r["message"]
        assert r["after"] == WORLD


def test_bad_target_in_one_ranks_target_batch_raises_on_every_rank(runs):
    for r in runs[0]["bad_target"]:
        assert r["seconds"] < TIMEOUT_S / 2
        assert r.get("error") == "PeerError" and r["is_value_error"], r
        assert r["phase"] == "in the target batch's step"
        assert list(r["failures"]) == [1]
        assert "rank 1: " in r["message"]
        assert ("kto_torch.distributed.kto_loss: argument 'targets[1, 3]' must be in [0, 13)"
                in r["message"])
        assert r["after"] == WORLD
