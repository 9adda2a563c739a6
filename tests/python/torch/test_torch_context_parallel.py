"""kto_torch.distributed.context_parallel_kto_loss on gloo processes, each holding a contiguous
slice of every sequence's tokens, against one process on the whole batch (kto_torch.kto_loss,
itself held to the float64 reference in test_torch.py).

Two runs, each launched as test_torch_faults.py's (torch.multiprocessing.spawn, a file
rendezvous, one pair or quartet of processes running every scenario in turn):

* 2 ranks, one context-parallel group: CSR slices (one rank's slice of a sequence empty) and
  padded [B, T_r, V] slices; sums and average_logprob; context_parallel_sequence_logprobs;
  a bad target on rank 1 (before the sequence all-reduce) and a bad label on rank 1 (in the
  finish) raise PeerError on both ranks and leave the group usable.
* 4 ranks, 2 context-parallel groups × 2 data-parallel replicas: z0 from both replicas' KL
  batches, and a fault on rank 3 raised on all four ranks, naming rank 3.

Tolerance rule: float64 throughout; a rank's slice sums its tokens' log-probs in the same order
one process does, and the all-reduce adds two partial sums, so each quantity differs from the
one-process value by a few units of rounding of its magnitude: |got − want| ≤ 1e-12 · (1 +
|want|) (1e-12 ≫ 2^-53 × the ≤ 20 terms of a sum here, ≪ any modelling error).
"""

import os
import time
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")
kto_torch = pytest.importorskip("kto_torch")

from gloo_ranks import spawn_ranks  # noqa: E402

TIMEOUT_S = 60
V = 17
LENGTHS = (7, 3, 5, 1)  # rows per sequence; the last one lies on rank 0 only (rank 1: empty)
RTOL = 1e-12


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    rows = sum(LENGTHS)
    logits = torch.randn(rows, V, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, V, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < 0.25] = -100
    targets[0] = -100  # a prompt row
    offsets = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    B = len(LENGTHS)
    kl_logits = torch.randn(B, 4, V, generator=g, dtype=torch.float64) * 2
    kl_targets = torch.randint(0, V, (B, 4), generator=g)
    kl_logp, kl_n = kto_torch.sequence_logprobs(kl_logits, kl_targets)
    padded = torch.randn(B, 6, V, generator=g, dtype=torch.float64) * 3
    padded_targets = torch.randint(0, V, (B, 6), generator=g)
    padded_targets[:, :2] = -100
    return dict(logits=logits, targets=targets, offsets=offsets, padded=padded,
                padded_targets=padded_targets, ref_logp=-20 + torch.randn(B, generator=g,
                                                                          dtype=torch.float64),
                desirable=torch.tensor([True, False, True, False]), kl_logp=kl_logp,
                kl_ref_logp=kl_logp - 0.3 + 0.5 * torch.randn(B, generator=g, dtype=torch.float64),
                kl_n=kl_n)


def _slice(batch, part, parts):
    """Rank `part`'s contiguous slice of every sequence: the first ceil(n / parts) rows to
    part 0, and so on; (rows of the logits, their targets, local offsets, global row ids)."""
    rows, offsets = [], [0]
    for s, n in enumerate(LENGTHS):
        per = -(-n // parts)
        begin = int(batch["offsets"][s]) + min(part * per, n)
        end = int(batch["offsets"][s]) + min((part + 1) * per, n)
        rows.extend(range(begin, end))
        offsets.append(len(rows))
    index = torch.tensor(rows, dtype=torch.int64)
    return (batch["logits"][index], batch["targets"][index], torch.tensor(offsets), index)


def _run(kto_dist, batch, cp_rank, cp_group, dp_group=None, fault=None, padded=False, **options):
    """One rank's step: (record) with its loss, metrics, per-example outputs and gradient."""
    if padded:  # [B, T_r, V]: each sequence's half of its 6 rows
        half = batch["padded"].shape[1] // 2
        cols = torch.arange(cp_rank * half, (cp_rank + 1) * half)
        logits, targets, offsets = batch["padded"][:, cols], batch["padded_targets"][:, cols], None
        index = cols
    else:
        logits, targets, offsets, index = _slice(batch, cp_rank, 2)
    targets = targets.clone()
    desirable = batch["desirable"].clone()
    if fault == "bad_target" and cp_rank == 1:
        targets.view(-1)[1] = V  # out of [0, V): found in this rank's local sums
    if fault == "bad_label" and cp_rank == 1:
        desirable = desirable.to(torch.int64)
        desirable[2] = 2  # found in the finish, after the all-reduces
    z = logits.detach().clone().requires_grad_(True)
    record = {}
    start = time.monotonic()
    try:
        out = kto_dist.context_parallel_kto_loss(
            z, targets, offsets, batch["ref_logp"], desirable, batch["kl_logp"],
            batch["kl_ref_logp"], batch["kl_n"], cp_group=cp_group, dp_group=dp_group, **options)
        out.loss.backward()
        record.update(loss=out.loss.detach(), metrics=out.metrics, logp=out.logp,
                      grad_logp=out.grad_logp, num_tokens=out.num_tokens, grad=z.grad,
                      index=index, columns=padded)
    except kto_dist.PeerError as e:
        record.update(error=type(e).__name__, message=str(e), failures=e.failures, phase=e.phase)
    record["seconds"] = time.monotonic() - start
    return record


SCENARIOS_2 = {
    "sum": dict(),
    "average": dict(average_logprob=True, link="neg_log_sigmoid"),
    "padded": dict(padded=True),
    "bad_target": dict(fault="bad_target"),
    "bad_label": dict(fault="bad_label"),
}


def _main_2(rank, init_file, batch, out_dir):
    import torch.distributed as dist

    import kto_torch.distributed as kto_dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=TIMEOUT_S))
    group = dist.new_group([0, 1])
    records = {name: _run(kto_dist, batch, rank, group, **kw) for name, kw in SCENARIOS_2.items()}
    logits, targets, offsets, _ = _slice(batch, rank, 2)
    records["logprobs"] = kto_dist.context_parallel_sequence_logprobs(
        logits, targets, offsets, sequences=len(LENGTHS), cp_group=group, average_logprob=True)
    check = torch.ones(1)  # the group is still usable after the PeerErrors
    dist.all_reduce(check, group=group)
    records["after"] = float(check)
    torch.save(records, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _main_4(rank, init_file, batches, out_dir):
    """Ranks (dp, cp) = divmod(rank, 2): cp groups {0, 1}, {2, 3}; dp groups {0, 2}, {1, 3}."""
    import torch.distributed as dist

    import kto_torch.distributed as kto_dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=4,
                            timeout=timedelta(seconds=TIMEOUT_S))
    dp, cp = divmod(rank, 2)
    cp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    records = {}
    for name, fault in (("healthy", None), ("fault", "bad_target")):
        records[name] = _run(kto_dist, batches[dp], cp, cp_groups[dp], dp_groups[cp],
                             fault=fault if dp == 1 else None)
    torch.save(records, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    batch = _batch(31)
    return spawn_ranks(_main_2, 2, batch, len(SCENARIOS_2) * TIMEOUT_S + 60), batch


@pytest.fixture(scope="module")
def four_ranks():
    batches = [_batch(41), _batch(42)]
    return spawn_ranks(_main_4, 4, batches, 2 * TIMEOUT_S + 60), batches


def _close(got, want, what):
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    bound = RTOL * (1 + want.abs())
    assert bool(((got - want).abs() <= bound).all()), f"{what}: {got} vs {want}"


def _one_process(batch, padded=False, global_kl=None, **options):
    """kto_loss on the whole batch, one process: (out, dlogits)."""
    logits = batch["padded"] if padded else batch["logits"]
    targets = batch["padded_targets"] if padded else batch["targets"]
    offsets = None if padded else batch["offsets"]
    z = logits.detach().clone().requires_grad_(True)
    kl = (dict(global_kl=global_kl) if global_kl is not None else
          dict(kl_policy_logp=batch["kl_logp"], kl_reference_logp=batch["kl_ref_logp"],
               kl_num_tokens=batch["kl_n"]))
    out = kto_torch.kto_loss(z, targets, offsets, batch["ref_logp"], batch["desirable"], **kl,
                             **options)
    out.loss.backward()
    return out, z.grad


def _check_equal_to_one_process(ranks, want, grad, what):
    for rank, r in enumerate(ranks):
        assert "error" not in r, r.get("message")
        _close(r["loss"], want.loss, f"{what}: rank {rank} loss")
        for name, value in want.metrics.items():
            _close(r["metrics"][name], value, f"{what}: rank {rank} metric {name}")
        _close(r["logp"], want.logp, f"{what}: rank {rank} logp")
        _close(r["grad_logp"], want.grad_logp, f"{what}: rank {rank} grad_logp")
        assert torch.equal(r["num_tokens"], want.num_tokens)
        # Each rank's gradient: its own rows of the one-process gradient.
        rows = grad[:, r["index"]] if r["columns"] else grad[r["index"]]
        _close(r["grad"], rows, f"{what}: rank {rank} dlogits")


@pytest.mark.parametrize("scenario", ["sum", "average", "padded"])
def test_two_ranks_equal_one_process(two_ranks, scenario):
    ranks, batch = two_ranks
    options = {k: v for k, v in SCENARIOS_2[scenario].items() if k != "padded"}
    want, grad = _one_process(batch, padded=scenario == "padded", **options)
    _check_equal_to_one_process([r[scenario] for r in ranks], want, grad, scenario)
    # The scenario is not trivial: each rank's gradient is nonzero.
    assert all(float(r[scenario]["grad"].abs().sum()) > 0 for r in ranks)


def test_the_empty_slice_gets_an_empty_gradient(two_ranks):
    ranks, _ = two_ranks
    _, _, offsets, _ = _slice(_batch(31), 1, 2)
    assert int(offsets[-1] - offsets[-2]) == 0  # rank 1 holds nothing of the last sequence
    assert ranks[1]["sum"]["grad"].shape[0] == int(offsets[-1])


def test_sequence_logprobs_are_the_whole_sequences(two_ranks):
    ranks, batch = two_ranks
    want, n = kto_torch.sequence_logprobs(batch["logits"], batch["targets"], batch["offsets"],
                                          average_logprob=True)
    for rank, r in enumerate(ranks):
        logp, got_n = r["logprobs"]
        _close(logp, want, f"rank {rank} logp")
        assert torch.equal(got_n, n)


def test_a_bad_target_on_one_rank_raises_on_both(two_ranks):
    ranks, _ = two_ranks
    for r in ranks:
        assert r["bad_target"].get("error") == "PeerError", r["bad_target"]
        assert r["bad_target"]["seconds"] < TIMEOUT_S / 2
        assert r["bad_target"]["phase"] == "before the sequence all-reduce"
        assert list(r["bad_target"]["failures"]) == [1]
        message = r["bad_target"]["message"]
        assert ("kto_torch.distributed.context_parallel_kto_loss: 1 of 2 context-parallel "
                "rank(s) failed before the sequence all-reduce") in message
        assert "argument 'targets[1]' must be in [0, 17)" in message
        assert r["after"] == 2


def test_a_bad_label_in_the_finish_raises_on_both(two_ranks):
    ranks, _ = two_ranks
    for r in ranks:
        assert r["bad_label"].get("error") == "PeerError", r["bad_label"]
        assert r["bad_label"]["phase"] == "in the target batch's step"
        assert list(r["bad_label"]["failures"]) == [1]
        assert ("kto_torch.distributed.context_parallel_kto_loss: argument 'desirable[2]' must "
                "be 0 (undesirable) or 1 (desirable)") in r["bad_label"]["message"]


def test_four_ranks_compose_with_data_parallel(four_ranks):
    ranks, batches = four_ranks
    global_kl = sum(kto_torch.kl_partial(b["kl_logp"], b["kl_ref_logp"], b["kl_n"])
                    for b in batches)
    for dp, batch in enumerate(batches):
        want, grad = _one_process(batch, global_kl=global_kl)
        _check_equal_to_one_process([ranks[2 * dp + cp]["healthy"] for cp in range(2)], want,
                                    grad, f"replica {dp}")
    # z0 is the global one: not either replica's own KL batch.
    alone, _ = _one_process(batches[0])
    assert abs(float(alone.metrics["kl"]) - float(ranks[0]["healthy"]["metrics"]["kl"])) > 1e-6


def test_a_fault_in_one_replica_raises_on_all_four_ranks(four_ranks):
    ranks, _ = four_ranks
    for rank, r in enumerate(ranks):
        fault = r["fault"]
        assert fault.get("error") == "PeerError", (rank, fault)
        assert fault["seconds"] < TIMEOUT_S / 2
        assert list(fault["failures"]) == [3]  # (dp 1, cp 1): every rank learns its cause
        assert ("1 of 4 context- and data-parallel rank(s) failed before the sequence "
                "all-reduce") in fault["message"]
        assert "rank 3: " in fault["message"] and "must be in [0, 17)" in fault["message"]


def test_options_are_checked_by_name():
    import kto_torch.distributed as kto_dist

    batch = _batch(5)
    with pytest.raises(TypeError, match=r"context_parallel_kto_loss: unknown option\(s\) "
                                        r"\['betta'\]"):
        kto_dist.context_parallel_kto_loss(batch["logits"], batch["targets"], batch["offsets"],
                                           batch["ref_logp"], batch["desirable"], cp_group=None,
                                           betta=0.2)
    with pytest.raises(kto_torch.KTOError, match=r"argument 'token_statistics' must be False"):
        kto_dist.context_parallel_kto_loss(batch["logits"], batch["targets"], batch["offsets"],
                                           batch["ref_logp"], batch["desirable"], cp_group=None,
                                           token_statistics=True)
    with pytest.raises(TypeError, match=r"'global_kl' is computed here"):
        kto_dist.kto_loss(batch["logits"], batch["targets"], batch["offsets"],
                          batch["ref_logp"], batch["desirable"], global_kl=torch.zeros(2))
