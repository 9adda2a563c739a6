"""kto_torch.distributed.context_parallel_kto_loss on gloo processes, each holding a contiguous
slice of every sequence's tokens, against one process on the whole batch (kto_torch.kto_loss,
itself held to the float64 reference in test_torch.py).

Two runs, each launched with gloo_ranks.spawn_ranks (one pair or quartet of processes running
every scenario in turn, in one process group):

* 2 ranks, one context-parallel group: CSR slices (one rank's slice of a sequence empty) and
  padded [B, T_r, V] slices; float64 and float32; sums, average_logprob, a fixed reference
  point, apo_zero_unpaired, logit transforms with reduction "sum";
  context_parallel_sequence_logprobs; and faults on one rank, each raising PeerError on both
  ranks and leaving the group usable: an unknown option and a short reference_logp (before
  any sum), a bad target (in the local sums), a bad label, a reference_logp that differs
  between the ranks, and a gradient too large for float16 logits (in the finish).
* 4 ranks, 2 context-parallel groups × 2 data-parallel replicas: z0 from both replicas' KL
  batches; context_parallel_sequence_logprobs with dp_group; a fault on rank 3 before the
  sums and one in its finish, each raised on all four ranks, naming rank 3.

Tolerance rule: a rank's slice sums its tokens' log-probs in the order one process does, and
the all-reduce adds the slices' sums in float64, so a quantity differs from the one-process
value by the rounding of those sums: float64 |got − want| ≤ 1e-12 · (1 + |want|) (≫ 2^-53 ×
the ≤ 20 terms of a sum here); float32, where one process adds a sequence's token log-probs in
float32, ≤ 1e-5 · (1 + |want|) (≫ 20 · 2^-24, the rounding of a 20-term float32 sum).
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
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}
FN = "kto_torch.distributed.context_parallel_kto_loss"


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
    ref_logp = -20 + torch.randn(B, generator=g, dtype=torch.float64)
    kl_ref_logp = kl_logp - 0.3 + 0.5 * torch.randn(B, generator=g, dtype=torch.float64)
    return dict(logits=logits, targets=targets, offsets=offsets, padded=padded,
                padded_targets=padded_targets, ref_logp=ref_logp,
                desirable=torch.tensor([True, False, True, False]), kl_logp=kl_logp,
                kl_ref_logp=kl_ref_logp, kl_n=kl_n)


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


def _run(kto_dist, batch, cp_rank, cp_group, dp_group=None, fault=None, padded=False,
         dtype=torch.float64, **options):
    """One rank's step: a record of its loss, metrics, per-example outputs and gradient, or
    of the PeerError it raised. `fault` is applied on cp rank 1 (rank 0 for "short_ref")."""
    if padded:  # [B, T_r, V]: each sequence's half of its 6 rows
        half = batch["padded"].shape[1] // 2
        cols = torch.arange(cp_rank * half, (cp_rank + 1) * half)
        logits, targets, offsets = batch["padded"][:, cols], batch["padded_targets"][:, cols], None
        index = cols
    else:
        logits, targets, offsets, index = _slice(batch, cp_rank, 2)
    targets = targets.clone()
    desirable, ref_logp = batch["desirable"].clone(), batch["ref_logp"].clone()
    faulty = cp_rank == (0 if fault == "short_ref" else 1)
    if faulty and fault == "bad_target":
        targets.view(-1)[1] = V  # out of [0, V): found in this rank's local sums
    if faulty and fault == "bad_label":
        desirable = desirable.to(torch.int64)
        desirable[2] = 2  # found in the finish, after the all-reduces
    if faulty and fault == "typo":
        options = dict(options, betta=0.2)
    if faulty and fault == "short_ref":
        ref_logp = ref_logp[:3]
    if faulty and fault == "other_ref":
        ref_logp = ref_logp + 1.0
    z = logits.detach().to(dtype).requires_grad_(True)
    record = {}
    start = time.monotonic()
    try:
        out = kto_dist.context_parallel_kto_loss(
            z, targets, offsets, ref_logp, desirable, batch["kl_logp"], batch["kl_ref_logp"],
            batch["kl_n"], cp_group=cp_group, dp_group=dp_group, **options)
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
    "float32": dict(dtype=torch.float32, average_logprob=True),
    "fixed": dict(reference_point="fixed", fixed_z0=0.2),
    "apo": dict(loss_type="apo_zero_unpaired"),
    "transform_sum": dict(logit_softcap=2.0, logit_scale=1.5, reduction="sum"),
    "typo": dict(fault="typo"),
    "short_ref": dict(fault="short_ref"),
    "bad_target": dict(fault="bad_target"),
    "bad_label": dict(fault="bad_label"),
    "other_ref": dict(fault="other_ref"),
    "float16_beta": dict(dtype=torch.float16, beta=1e6, reduction="sum"),
}
HEALTHY = ("sum", "average", "padded", "float32", "fixed", "apo", "transform_sum")


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
    for name, fault in (("healthy", None), ("fault", "bad_target"), ("finish", "bad_label")):
        records[name] = _run(kto_dist, batches[dp], cp, cp_groups[dp], dp_groups[cp],
                             fault=fault if dp == 1 else None)
    logits, targets, offsets, _ = _slice(batches[dp], cp, 2)
    records["logprobs"] = kto_dist.context_parallel_sequence_logprobs(
        logits, targets, offsets, sequences=len(LENGTHS), cp_group=cp_groups[dp],
        dp_group=dp_groups[cp])
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
    return spawn_ranks(_main_4, 4, batches, 3 * TIMEOUT_S + 60), batches


def _close(got, want, what, rtol=RTOL[torch.float64]):
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    bound = rtol * (1 + want.abs())
    assert bool(((got - want).abs() <= bound).all()), f"{what}: {got} vs {want}"


def _one_process(batch, padded=False, global_kl=None, dtype=torch.float64, **options):
    """kto_loss on the whole batch, one process: (out, dlogits)."""
    logits = batch["padded"] if padded else batch["logits"]
    targets = batch["padded_targets"] if padded else batch["targets"]
    offsets = None if padded else batch["offsets"]
    z = logits.detach().to(dtype).requires_grad_(True)
    kl = (dict(global_kl=global_kl) if global_kl is not None else
          dict(kl_policy_logp=batch["kl_logp"], kl_reference_logp=batch["kl_ref_logp"],
               kl_num_tokens=batch["kl_n"]))
    out = kto_torch.kto_loss(z, targets, offsets, batch["ref_logp"], batch["desirable"], **kl,
                             **options)
    out.loss.backward()
    return out, z.grad


def _check_equal_to_one_process(ranks, want, grad, what, rtol=RTOL[torch.float64]):
    for rank, r in enumerate(ranks):
        assert "error" not in r, r.get("message")
        assert r["loss"].dtype == want.loss.dtype
        _close(r["loss"], want.loss, f"{what}: rank {rank} loss", rtol)
        for name, value in want.metrics.items():
            _close(r["metrics"][name], value, f"{what}: rank {rank} metric {name}", rtol)
        _close(r["logp"], want.logp, f"{what}: rank {rank} logp", rtol)
        _close(r["grad_logp"], want.grad_logp, f"{what}: rank {rank} grad_logp", rtol)
        assert torch.equal(r["num_tokens"], want.num_tokens)
        # Each rank's gradient: its own rows of the one-process gradient.
        rows = grad[:, r["index"]] if r["columns"] else grad[r["index"]]
        assert r["grad"].dtype == rows.dtype
        _close(r["grad"], rows, f"{what}: rank {rank} dlogits", rtol)
        assert float(r["grad"].abs().sum()) > 0  # not a trivial scenario


@pytest.mark.parametrize("scenario", HEALTHY)
def test_two_ranks_equal_one_process(two_ranks, scenario):
    ranks, batch = two_ranks
    options = dict(SCENARIOS_2[scenario])
    dtype = options.get("dtype", torch.float64)
    want, grad = _one_process(batch, **options)
    _check_equal_to_one_process([r[scenario] for r in ranks], want, grad, scenario, RTOL[dtype])


def test_the_scenarios_differ():
    """Each option reached the library: the one-process losses of the scenarios differ."""
    batch = _batch(31)
    losses = {name: _one_process(batch, **SCENARIOS_2[name])[0].loss.item() for name in HEALTHY}
    assert len(set(losses.values())) == len(losses), losses


def test_sequence_logprobs_are_the_whole_sequences(two_ranks):
    ranks, batch = two_ranks
    want, n = kto_torch.sequence_logprobs(batch["logits"], batch["targets"], batch["offsets"],
                                          average_logprob=True)
    for rank, r in enumerate(ranks):
        logp, got_n = r["logprobs"]
        _close(logp, want, f"rank {rank} logp")
        assert torch.equal(got_n, n)
        assert r["after"] == 2


def _peer_error(record, phase, failures):
    assert record.get("error") == "PeerError", record
    assert record["seconds"] < TIMEOUT_S / 2
    assert record["phase"] == phase
    assert sorted(record["failures"]) == failures
    return record["message"]


@pytest.mark.parametrize("scenario,phase,failures,says", [
    ("typo", "before the sequence all-reduce", [1],
     f"{FN}: unknown option(s) ['betta']"),
    ("short_ref", "before the sequence all-reduce", [0, 1],
     f"{FN}: argument 'reference_logp' must be the same on every rank of cp_group (one entry "
     "per sequence); got 3 here, between 3 and 4 on the group"),
    ("bad_target", "before the sequence all-reduce", [1],
     f"{FN}: argument 'targets[1]' must be in [0, 17)"),
    # Rank 1's label is refused by the finish; rank 0 finds that the ranks' labels differ.
    ("bad_label", "in the target batch's step", [0, 1],
     f"rank 1: KTOError: {FN}: argument 'desirable[2]' must be 0 (undesirable) or 1"),
    ("other_ref", "in the target batch's step", [0, 1],
     f"{FN}: argument 'reference_logp' must be the same on every rank of cp_group"),
    ("float16_beta", "in the target batch's step", [0, 1],
     f"{FN}: argument 'beta' must keep every element of the half logits' gradient"),
])
def test_a_fault_on_one_rank_raises_on_both(two_ranks, scenario, phase, failures, says):
    ranks, _ = two_ranks
    for r in ranks:
        message = _peer_error(r[scenario], phase, failures)
        assert (f"{FN}: {len(failures)} of 2 context-parallel rank(s) failed {phase}"
                in message), message
        assert says in message, message
        assert r["after"] == 2


def test_four_ranks_compose_with_data_parallel(four_ranks):
    ranks, batches = four_ranks
    global_kl = sum(kto_torch.kl_partial(b["kl_logp"], b["kl_ref_logp"], b["kl_n"])
                    for b in batches)
    for dp, batch in enumerate(batches):
        want, grad = _one_process(batch, global_kl=global_kl)
        _check_equal_to_one_process([ranks[2 * dp + cp]["healthy"] for cp in range(2)], want,
                                    grad, f"replica {dp}")
        logp, n = kto_torch.sequence_logprobs(batch["logits"], batch["targets"],
                                              batch["offsets"])
        for cp in range(2):
            _close(ranks[2 * dp + cp]["logprobs"][0], logp, f"replica {dp} rank {cp} logp")
            assert torch.equal(ranks[2 * dp + cp]["logprobs"][1], n)
    # z0 is the global one: not either replica's own KL batch.
    alone, _ = _one_process(batches[0])
    assert abs(float(alone.metrics["kl"]) - float(ranks[0]["healthy"]["metrics"]["kl"])) > 1e-6


@pytest.mark.parametrize("scenario,phase,says", [
    ("fault", "before the sequence all-reduce", "argument 'targets[1]' must be in [0, 17)"),
    ("finish", "in the target batch's step", "argument 'desirable[2]' must be 0"),
])
def test_a_fault_in_one_replica_raises_on_all_four_ranks(four_ranks, scenario, phase, says):
    ranks, _ = four_ranks
    # (dp 1, cp 1) fails; in the finish its group partner (2) too: the labels differ.
    failing = [3] if scenario == "fault" else [2, 3]
    for r in ranks:
        message = _peer_error(r[scenario], phase, failing)  # every rank knows why
        assert (f"{FN}: {len(failing)} of 4 context- and data-parallel rank(s) failed {phase}"
                in message), message
        assert f"rank 3: KTOError: {FN}: {says}" in message, message


def test_options_are_checked_by_name(tmp_path):
    """One process, a group of one: the checks raise through the same protocol."""
    import torch.distributed as dist

    import kto_torch.distributed as kto_dist

    batch = _batch(5)
    args = (batch["logits"], batch["targets"], batch["offsets"], batch["ref_logp"],
            batch["desirable"])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        with pytest.raises(kto_dist.PeerError, match=r"context_parallel_kto_loss: unknown "
                                                     r"option\(s\) \['betta'\]"):
            kto_dist.context_parallel_kto_loss(*args, cp_group=None, betta=0.2)
        with pytest.raises(kto_dist.PeerError, match=r"argument 'token_statistics' must be "
                                                     r"False"):
            kto_dist.context_parallel_kto_loss(*args, cp_group=None, token_statistics=True)
        with pytest.raises(kto_dist.PeerError, match=r"'global_kl' is computed here"):
            kto_dist.kto_loss(*args, global_kl=torch.zeros(2))
    finally:
        dist.destroy_process_group()
