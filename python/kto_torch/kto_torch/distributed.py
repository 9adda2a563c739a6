"""KTO over torch.distributed, data parallel and context parallel, failing together
instead of hanging.

z0 comes from the whole global batch, so every rank joins one all-reduce of the KL
batch's (S, C) before its loss. A rank that raised before that collective (a NaN in
its KL log-probs, a wrong shape) would leave the others waiting in it forever; a rank
that raised after it, on its target batch, would leave them waiting in DDP's gradient
all-reduce. Each function here closes both holes: a rank that fails still joins every
collective, with a failure flag, and then every rank raises ``PeerError`` naming each
failing rank and its cause (on a failing rank its own exception is the ``__cause__``).

Data parallel, ``kto_loss``::

    import kto_torch.distributed as kto_dist

    with torch.no_grad():
        kl_logp, kl_n = kto_torch.sequence_logprobs(kl_logits, kl_targets)
    out = kto_dist.kto_loss(logits, targets, None, reference_logp, desirable,
                            kl_logp, kl_reference_logp, kl_n, beta=0.1)
    out.loss.backward()                        # DDP's gradient all-reduce as usual

1. The local KL partial (S, C) from the KL batch's log-probs, inside ``try``.
2. One all-reduce (SUM) of [S, C, failed]: a rank that failed still joins.
3. ``kto_torch.kto_loss(..., global_kl=(S, C))`` on the local target batch, inside ``try``.
4. A second all-reduce of a 1-element failure flag, so that an error in one rank's target
   batch (a target id out of range, NaN logits) raises on every rank before any of them
   reaches the backward's collectives.

Context (sequence) parallel, ``context_parallel_kto_loss``: each rank of ``cp_group``
holds a contiguous slice of every sequence's tokens (its rows of the logits and targets).
A sequence's log-prob is a sum over its tokens, so the ranks all-reduce their per-sequence
sums and token counts, every rank finishes the loss of the whole sequences, and each
backward is local to its rows (docs/integrations.md, "Context parallel").

Cost per step: a latency-bound all-reduce of a few float64 per collective (2B + 1 for the
context-parallel sums), plus a host synchronisation to read each result; the gather of
error messages runs only when something failed. The collectives use a tensor on the
logits' device when they are on CUDA (NCCL), on the CPU otherwise (gloo). Ranks are named
by their global rank. After a PeerError the groups are still usable: every rank left the
step at the same point.

Options are those of ``kto_torch.kto_loss`` (beta, weights, loss_type, ...,
``mean_denominator``: set it to the global batch size only where gradients are summed
across ranks; leave it at 0 with DDP, which averages them). ``global_kl`` is computed
here and may not be passed.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

import kto_torch
from kto_torch import _C
from kto_torch._errors import KTOError, KTOTypeError, PeerError
from kto_torch._ops import EXAMPLE_OUTPUT_NAMES, OPTION_NAMES, _accumulation, _options
from kto_torch.functional import KTOOutput, _fail, _kto_output, _padded_offsets, _tensors

__all__ = ["PeerError", "context_parallel_kto_loss", "context_parallel_sequence_logprobs",
           "kto_loss", "sum_or_fail"]

_FN = "kto_torch.distributed.kto_loss"
_CP_FN = "kto_torch.distributed.context_parallel_kto_loss"
_CP_LOGPROBS_FN = "kto_torch.distributed.context_parallel_sequence_logprobs"
# The options that shape a sequence's log-prob (those sequence_logprobs takes).
_LOGPROB_OPTIONS = ("average_logprob", "ignore_index", "logit_scale", "logit_softcap",
                    "temperature")


def _collective_device(anchor: Tensor) -> torch.device:
    return anchor.device if anchor.is_cuda else torch.device("cpu")


def _device(logits) -> torch.device:
    """The collectives' device: the logits' if on CUDA (NCCL), else the CPU (also for a
    rank whose `logits` is not a tensor: it still joins, with its error)."""
    return _collective_device(logits) if isinstance(logits, Tensor) else torch.device("cpu")



def _check_options(fn: str, options: dict) -> None:
    """The loss options by name: an unknown keyword (a typo) is refused, not ignored."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if "global_kl" in unknown:
        raise KTOTypeError(f"{fn}: 'global_kl' is computed here (the all-reduced KL batch); "
                           "call kto_torch.kto_loss to pass one yourself")
    if unknown:
        raise KTOTypeError(f"{fn}: unknown option(s) {unknown}; the options are "
                           f"{sorted(OPTION_NAMES)}")


def _uses_kl_batch(options: dict) -> bool:
    return (options.get("reference_point", "kl_batch") == "kl_batch"
            and options.get("loss_type", "kto") == "kto")


def _message(error: BaseException) -> str:
    """An exception with the notes its rank added (where it failed)."""
    return " ".join([f"{type(error).__name__}: {error}", *getattr(error, "__notes__", ())])


def _raise_if_failed(failed: float, error: Optional[BaseException], phase: str,
                     groups: Sequence, fn: str, kind: str) -> None:
    """Every rank of `groups` calls this with the same verdict `failed` (an all-reduced
    count). The messages are gathered over each group in turn, so that with a context- and
    a data-parallel group every rank learns every failing rank's cause."""
    if failed == 0:
        return
    failures: Dict[int, str] = {}
    if error is not None:
        failures[dist.get_rank()] = _message(error)
    ranks = 1
    for group in groups:
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, failures, group=group)
        failures = {rank: m for part in gathered for rank, m in part.items()}
        ranks *= len(gathered)
    causes = "; ".join(f"rank {rank}: {message}" for rank, message in sorted(failures.items()))
    message = (f"{fn}: {len(failures)} of {ranks} {kind} rank(s) failed {phase} "
               f"(rank {dist.get_rank()} raises with them) — {causes}")
    raise PeerError(message, failures, phase) from error


def _all_reduce_with_flag(values: Optional[Tensor], failed: float, size: int, device,
                          group) -> tuple:
    """One all-reduce (SUM) of [values..., failed] in float64: (the sums, the failure count)."""
    reduced = torch.zeros(size + 1, dtype=torch.float64, device=device)
    reduced[size] = failed
    if failed == 0 and size > 0:
        reduced[:size] = values.reshape(-1).to(reduced)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return reduced[:size].clone(), float(reduced[size])


def sum_or_fail(values: Optional[Tensor], error: Optional[BaseException], phase: str, *,
                size: int, device, group=None, fn: str = _FN) -> Tensor:
    """The collective of a step that may have failed on some ranks; every rank calls it.

    A rank that succeeded passes ``values`` (``size`` elements) and ``error=None``; one that
    failed passes its exception (``values`` is then ignored). One all-reduce (SUM) of
    [values..., failed] in float64 on ``device``; if any rank failed, every rank raises
    PeerError (naming ``fn``, each failing rank and its cause, and ``phase``), else each gets
    the sum (float64 [size] on ``device``). ``size=0`` is a bare failure flag."""
    sums, failed = _all_reduce_with_flag(values, float(error is not None), size, device, group)
    _raise_if_failed(failed, error, phase, [group], fn, "data-parallel")
    return sums


def _sum_over_groups(values: Optional[Tensor], error: Optional[BaseException], phase: str,
                     size: int, device, cp_group, dp_group, fn: str) -> Tensor:
    """sum_or_fail over the context-parallel group, with the verdict carried over the
    data-parallel group too (a bare flag), so that every rank raises together."""
    sums, failed = _all_reduce_with_flag(values, float(error is not None), size, device,
                                         cp_group)
    groups = [cp_group]
    if dp_group is not None:
        _, failed = _all_reduce_with_flag(None, failed, 0, device, dp_group)
        groups.append(dp_group)
    _raise_if_failed(failed, error, phase, groups, fn, _kind(dp_group))
    return sums


def _kind(dp_group) -> str:
    return "context-parallel" if dp_group is None else "context- and data-parallel"


def kto_loss(logits: Tensor, targets: Tensor, offsets: Optional[Tensor], reference_logp: Tensor,
             desirable: Tensor, kl_policy_logp: Optional[Tensor] = None,
             kl_reference_logp: Optional[Tensor] = None, kl_num_tokens: Optional[Tensor] = None,
             *, group=None, **options) -> KTOOutput:
    """kto_torch.kto_loss over a data-parallel group: z0 from the global KL batch, and an
    error on any rank raised on every rank as PeerError (see the module docstring).

    The arguments are kto_loss's, the KL batch as its log-probs (``kl_policy_logp``,
    ``kl_reference_logp``, ``kl_num_tokens``: this rank's KL sequences, from
    ``kto_torch.sequence_logprobs`` under ``torch.no_grad()``). ``group``: the data-parallel
    process group (default: the world)."""
    device = _device(logits)
    partial, error = None, None
    try:  # every check inside: a rank that raised here would leave the others in the all-reduce
        _check_options(_FN, options)
        _tensors(_FN, logits=logits)
        partial = _local_kl_partial(_FN, kl_policy_logp, kl_reference_logp, kl_num_tokens,
                                    options)
    except Exception as e:  # noqa: BLE001 — carried to every rank below
        error = _in_our_name(_FN, e)
    global_kl = sum_or_fail(partial, error, "before the KL all-reduce", size=2, device=device,
                            group=group)

    out = None
    try:
        out = kto_torch.kto_loss(logits, targets, offsets, reference_logp, desirable,
                                 global_kl=global_kl, **options)
    except Exception as e:  # noqa: BLE001
        error = _in_our_name(_FN, e)
    sum_or_fail(None, error, "in the target batch's step", size=0, device=device, group=group)
    return out


def _local_kl_partial(fn: str, kl_policy_logp, kl_reference_logp, kl_num_tokens,
                      options: dict) -> Tensor:
    """This rank's (S, C) of its KL batch, float64 [2] on the CPU ((0, 0) where the loss uses
    no KL batch)."""
    if not _uses_kl_batch(options):
        return torch.zeros(2, dtype=torch.float64)
    for name, value in (("kl_policy_logp", kl_policy_logp),
                        ("kl_reference_logp", kl_reference_logp)):
        if value is None:
            _fail(KTOError, fn, name, "must be given with reference_point='kl_batch' (the KL "
                                      "batch's log-probs); got None")
    if kl_num_tokens is None:
        kl_num_tokens = torch.empty((0,), dtype=torch.int64)
    return kto_torch.kl_partial(kl_policy_logp, kl_reference_logp, kl_num_tokens,
                                kl_estimator=options.get("kl_estimator", "mean"))


# ---- context parallel ----
#
# Every check, even of an argument's type, runs inside a `try` whose failure travels with the
# next collective: a rank that raised before a collective would leave the others in it.
# The collectives, every rank in the same order:
#   1. agree on B (MAX over cp_group): the size of the next one;
#   2. the sequence sums [Σℓ (B), n (B), fingerprint (4), failed] (SUM over cp_group);
#   3. with dp_group: [S, C, failed] (SUM over dp_group); then raise together if any failed;
#   4. after the finish: a failure flag over cp_group, then dp_group.

def _in_our_name(fn: str, error: BaseException) -> BaseException:
    """An error of a kto_torch function called here, in this function's name (its class,
    argument and location kept)."""
    called = getattr(error, "function", "")
    if isinstance(error, KTOError) and called and called != fn:
        renamed = copy.copy(error)
        renamed.args = (str(error).replace(called, fn, 1),)
        renamed.function = fn
        renamed.__cause__ = error
        return renamed
    return error


def _agree_on_count(count: int, error: Optional[BaseException], name: str, device, group,
                    fn: str) -> tuple:
    """Collective 1: every rank's `count` (B) must be equal; a rank that failed already
    passes no count. Returns (the group's count, this rank's error or a disagreement)."""
    mine = torch.tensor([-1.0, -2.0**60] if error is not None else [count, -count],
                        dtype=torch.float64, device=device)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=group)
    largest, smallest = int(mine[0]), -int(mine[1])
    if error is None and largest >= 0 and smallest != largest:
        error = KTOError(f"{fn}: argument '{name}' must be the same on every rank of cp_group "
                         f"(one entry per sequence); got {count} here, between {smallest} and "
                         f"{largest} on the group")
        error.function, error.argument = fn, name
    return max(largest, 0), error


def _local_sums(fn: str, logits: Tensor, targets: Tensor, offsets: Tensor, sequences: int,
                options: dict) -> tuple:
    """This rank's per-sequence log-prob sums and scored-token counts over its rows (the
    mean, with average_logprob, needs the whole count: it is taken after the all-reduce),
    and its rows' lse for the backward."""
    local = dict(options, average_logprob=False)
    logp_sum, n, row_lse = torch.ops.kto.sequence_logprobs(
        logits.detach(), targets, offsets,
        _options(fn, **{k: local[k] for k in _LOGPROB_OPTIONS if k in local}))
    if logp_sum.numel() != sequences:
        _fail(KTOError, fn, "offsets", f"must delimit {sequences} sequences (B, on every rank of "
                                       f"cp_group); got {logp_sum.numel()}")
    return logp_sum, n, row_lse


def _whole(sums: Tensor, sequences: int, average_logprob: bool) -> tuple:
    """The whole sequences' log-probs and token counts from the all-reduced sums."""
    logp_sum = sums[:sequences]
    n = sums[sequences:2 * sequences].round().to(torch.int64)
    logp = logp_sum / n.clamp(min=1) if average_logprob else logp_sum
    return logp, n


def _offsets(fn: str, logits: Tensor, offsets: Optional[Tensor]) -> Tensor:
    return _padded_offsets(fn, "logits", logits) if offsets is None else offsets


def context_parallel_sequence_logprobs(logits: Tensor, targets: Tensor,
                                       offsets: Optional[Tensor] = None, *, sequences: int,
                                       cp_group, dp_group=None, **options) -> tuple:
    """Each whole sequence's log-prob and scored-token count from this rank's slice of its
    tokens, forward only: the context-parallel twin of ``kto_torch.sequence_logprobs`` (for
    the KL batch and the reference model when their tokens are sharded too).

    Args:
        logits, targets, offsets: this rank's rows, as sequence_logprobs takes them; offsets
            delimit each sequence's slice on this rank (a slice may be empty).
        sequences: B, the same on every rank.
        cp_group: the context-parallel process group; dp_group: the data-parallel one, over
            which only a failure is carried (None: no data parallel).
        average_logprob, ignore_index, logit_scale, logit_softcap, temperature: as in
            sequence_logprobs.

    Returns (logp [B] float64, num_tokens [B] int64) on the collective device, the same on
    every rank of ``cp_group``; PeerError on every rank where any failed.
    """
    fn = _CP_LOGPROBS_FN
    device = _device(logits)
    error = None
    try:
        unknown = sorted(set(options) - set(_LOGPROB_OPTIONS))
        if unknown:
            raise KTOTypeError(f"{fn}: unknown option(s) {unknown}; the options are "
                               f"{sorted(_LOGPROB_OPTIONS)}")
        _tensors(fn, logits=logits, targets=targets, offsets=offsets)
        if not isinstance(sequences, int) or sequences < 0:
            _fail(KTOError, fn, "sequences", f"must be an int >= 0; got {sequences!r}")
    except Exception as e:  # noqa: BLE001 — carried to every rank
        error = e
    sequences, error = _agree_on_count(sequences if error is None else 0, error, "sequences",
                                       device, cp_group, fn)
    values = None
    if error is None:
        try:
            logp_sum, n, _ = _local_sums(fn, logits, targets, _offsets(fn, logits, offsets),
                                         sequences, options)
            values = torch.cat([logp_sum.double(), n.double()])
        except Exception as e:  # noqa: BLE001
            error = _in_our_name(fn, e)
    sums = _sum_over_groups(values, error, "before the sequence all-reduce", 2 * sequences,
                            device, cp_group, dp_group, fn)
    return _whole(sums, sequences, bool(options.get("average_logprob", False)))


class _LocalRowsGradient(torch.autograd.Function):
    """The loss of the whole sequences, differentiable w.r.t. this rank's rows only:
    ∂L/∂z_r = g_s · ∂logp_s/∂z_r needs g_s, the whole n_s (average_logprob) and this rank's
    lse — no communication (kto::step_backward on the local rows)."""

    @staticmethod
    def forward(ctx, logits, loss, targets, offsets, row_lse, grad_logp, num_tokens, options):
        ctx.save_for_backward(logits, targets, offsets, row_lse, grad_logp, num_tokens)
        ctx.options = options
        return loss.clone()

    @staticmethod
    def backward(ctx, g):
        logits, targets, offsets, row_lse, grad_logp, num_tokens = ctx.saved_tensors
        scaled = grad_logp * g.to(grad_logp.dtype)
        dlogits = torch.ops.kto.step_backward(logits, targets, offsets, row_lse, scaled,
                                              num_tokens, ctx.options)
        return (dlogits,) + (None,) * 7


# What every rank of cp_group must pass alike, summed with the sequence sums: Σ reference_logp,
# Σ desirable and the KL batch's (S, C). Equal inputs sum to R times each rank's own; a rank
# that differs makes every rank raise in the finish's failure flag.
# (the argument named, what differs) of each entry.
_FINGERPRINT = (("reference_logp", "reference_logp"), ("desirable", "desirable"),
                ("kl_policy_logp", "the KL batch's S"), ("kl_policy_logp", "the KL batch's C"))


def _fingerprint(reference_logp: Tensor, desirable: Tensor, kl: Tensor) -> Tensor:
    return torch.stack([reference_logp.detach().double().sum().cpu(),
                        desirable.detach().double().sum().cpu(), kl[0].cpu(), kl[1].cpu()])


def _check_fingerprint(fn: str, mine: Tensor, summed: Tensor, ranks: int) -> None:
    for k, (argument, what) in enumerate(_FINGERPRINT):
        want = ranks * float(mine[k])
        if abs(float(summed[k]) - want) > 1e-12 * ranks * (1.0 + abs(want)):
            _fail(KTOError, fn, argument,
                  f"must be the same on every rank of cp_group ({what}); the ranks' sums "
                  f"differ: {float(summed[k])!r} over {ranks} ranks, {float(mine[k])!r} here")


def context_parallel_kto_loss(logits: Tensor, targets: Tensor, offsets: Optional[Tensor],
                              reference_logp: Tensor, desirable: Tensor,
                              kl_policy_logp: Optional[Tensor] = None,
                              kl_reference_logp: Optional[Tensor] = None,
                              kl_num_tokens: Optional[Tensor] = None, *, cp_group,
                              dp_group=None, **options) -> KTOOutput:
    """The KTO loss of sequences whose tokens are split over the ranks of ``cp_group``.

    Each rank passes its contiguous slice of every sequence: its rows of the logits and
    targets, with ``offsets`` delimiting each sequence's slice (a slice may be empty), or
    [B, T_r, V] logits (offsets None: each sequence's T_r rows here). Every rank of the group
    passes the same B, ``reference_logp``, ``desirable``, KL batch and options (the first
    three and the KL batch are checked: a rank that differs raises on every rank).

    1. local: this rank's per-sequence log-prob sums and scored-token counts (and its rows'
       lse, for the backward), and the KL batch's (S, C), inside ``try``;
    2. one all-reduce (SUM) over ``cp_group`` of [Σℓ (B), n (B), failed] (after a MAX one
       that agrees on B);
    3. with ``dp_group``: one all-reduce of [S, C, failed] over it (the KL batch of the
       global batch, as ``kto_loss``'s); without it, the KL batch is this group's whole;
    4. the loss, metrics and g_s of the whole sequences (kto::finish), the same on every
       rank of the group, and the check that the gradient fits the logits' dtype; a failure
       flag over both groups;
    5. ``loss.backward()``: ∂L/∂logits for this rank's rows only, no communication.

    The KL batch: its whole sequences' log-probs (``kl_policy_logp``, ``kl_reference_logp``,
    ``kl_num_tokens``), the same on every rank of ``cp_group``; where its tokens are sharded
    too, from ``context_parallel_sequence_logprobs``. The gradient each rank gets is its
    rows' share of the gradient of the whole loss: the parameters' gradients are summed over
    ``cp_group`` (a trainer that averages them over a folded dp × cp mesh multiplies the loss
    by the group's size first, as Megatron and torchtitan do).

    Returns a KTOOutput as kto_loss's (loss, metrics and per-sequence outputs on the logits'
    device, the same on every rank of the group; ``num_tokens`` the whole sequences');
    PeerError on every rank where any failed. ``token_statistics`` is not offered here.
    """
    fn = _CP_FN
    device = _device(logits)
    groups = [cp_group] + ([dp_group] if dp_group is not None else [])
    error, sequences = None, 0
    try:  # checks of this rank's arguments alone
        _check_options(fn, options)
        if options.get("token_statistics", False):
            _fail(KTOError, fn, "token_statistics",
                  "must be False: the context-parallel loss does not sum token statistics "
                  "over the group (kto::cpu::context_parallel_kto_step does); got True")
        _tensors(fn, logits=logits, targets=targets, offsets=offsets,
                 reference_logp=reference_logp, desirable=desirable,
                 kl_policy_logp=kl_policy_logp, kl_reference_logp=kl_reference_logp,
                 kl_num_tokens=kl_num_tokens)
        if reference_logp.dim() != 1:
            _fail(KTOError, fn, "reference_logp", f"must be 1-D (one entry per sequence); got "
                                                  f"shape {list(reference_logp.shape)}")
        sequences = reference_logp.numel()
    except Exception as e:  # noqa: BLE001 — carried to every rank
        error = e
    sequences, error = _agree_on_count(sequences, error, "reference_logp", device, cp_group, fn)

    values, local, mine = None, None, None
    if error is None:
        try:
            offsets = _offsets(fn, logits, offsets)
            local = _local_sums(fn, logits, targets, offsets, sequences, options)
            kl = _local_kl_partial(fn, kl_policy_logp, kl_reference_logp, kl_num_tokens,
                                   options)
            mine = _fingerprint(reference_logp, desirable, kl)
            values = torch.cat([local[0].double().cpu(), local[1].double().cpu(), mine])
        except Exception as e:  # noqa: BLE001
            error = _in_our_name(fn, e)
    size = 2 * sequences + len(_FINGERPRINT)
    sums, failed = _all_reduce_with_flag(values, float(error is not None), size, device,
                                         cp_group)
    global_kl = None if failed else kl.to(device)
    if dp_group is not None:  # the KL batch of the global batch, and the verdict
        global_kl, failed = _all_reduce_with_flag(global_kl, failed, 2, device, dp_group)
    _raise_if_failed(failed, error, "before the sequence all-reduce", groups, fn,
                     _kind(dp_group))

    out = None
    try:
        logp, n = _whole(sums, sequences, bool(options.get("average_logprob", False)))
        all_options = _options(fn, **options)
        metrics, per_example = _C.finish(logp.cpu(), reference_logp.cpu(), desirable.cpu(),
                                         global_kl.cpu(), n.cpu(), logits, all_options)
        # After the finish's own checks, which name a bad value more precisely.
        _check_fingerprint(fn, mine, sums[2 * sequences:].cpu(),
                           dist.get_world_size(cp_group))
        acc = _accumulation(logits)
        per_example = per_example.to(device=logits.device, dtype=acc)
        metrics = metrics.to(logits.device)
        grad_logp = per_example[EXAMPLE_OUTPUT_NAMES.index("grad_logp")]
        loss = _LocalRowsGradient.apply(logits, metrics[0].to(acc), targets, offsets, local[2],
                                        grad_logp, n.to(logits.device), all_options)
        out = _kto_output(logits, metrics, per_example, n.to(logits.device), None)
        out = out._replace(loss=loss)
    except Exception as e:  # noqa: BLE001 — carried to every rank
        error = _in_our_name(fn, e)
    _sum_over_groups(None, error, "in the target batch's step", 0, device, cp_group, dp_group,
                     fn)
    return out
