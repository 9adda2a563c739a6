"""Data-parallel KTO over torch.distributed that fails together instead of hanging.

z0 comes from the whole global batch, so every rank joins one all-reduce of the
KL batch's (S, C) before its loss. A rank that raised before that collective
(a NaN in its KL logits, a wrong shape) would leave the others waiting in it
forever; a rank that raised after it, on its target batch, would leave them
waiting in DDP's gradient all-reduce. ``kto_loss`` below closes both holes:

    import kto_torch.distributed as kto_dist

    out = kto_dist.kto_loss(logits, targets, None, reference_logp, desirable,
                            kl_logits=kl_logits, kl_targets=kl_labels,
                            kl_reference_logp=kl_reference_logp,
                            beta=0.1)          # or kl_policy_logp=... (log-probs)
    out.loss.backward()                        # DDP's gradient all-reduce as usual

1. The local KL partial (S, C) is computed inside ``try`` — from the KL batch's
   policy log-probs ``kl_policy_logp`` (and ``kl_num_tokens``), or from its
   logits (``kl_logits``, ``kl_targets``, ``kl_offsets``; forward only,
   ``kto_torch.sequence_logprobs``) — with ``kl_reference_logp``.
2. One all-reduce (SUM) of [S, C, failed]: a rank that failed still joins,
   with failed = 1.
3. If any rank failed, every rank gathers the error messages
   (``all_gather_object``) and raises ``PeerError`` (a ValueError) naming each
   failing rank and its cause; on a failing rank its own exception is the
   ``__cause__``.
4. ``kto_torch.kto_loss(..., global_kl=(S, C))`` on the local target batch,
   inside ``try``.
5. A second all-reduce of a 1-element failure flag, with the same gather and
   raise, so that an error in one rank's target batch (a target id out of
   range, NaN logits) raises on every rank before any of them reaches the
   backward's collectives.

Cost per step: the (S, C, failed) all-reduce of three float64 (the one the
plain recipe has anyway, plus one element) and one more all-reduce of a single
float64 — a latency-bound collective, microseconds on one node — plus a host
synchronisation to read each result. The gather runs only when something
failed. The collectives use ``group`` (default: the world) and a tensor on the
logits' device when they are on CUDA (NCCL), on the CPU otherwise (gloo).
Ranks are named by their global rank. After a PeerError the group is still
usable: every rank left the step at the same point.

Options are those of ``kto_torch.kto_loss`` (beta, weights, loss_type, ...,
``mean_denominator``: set it to the global batch size only where gradients are
summed across ranks; leave it at 0 with DDP, which averages them). ``global_kl``
is computed here and may not be passed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

import kto_torch
from kto_torch._errors import PeerError

__all__ = ["PeerError", "kto_loss", "sum_or_fail"]

_FN = "kto_torch.distributed.kto_loss"


def _collective_device(logits: Tensor) -> torch.device:
    return logits.device if logits.is_cuda else torch.device("cpu")


def _raise_if_failed(failed: float, error: Optional[BaseException], phase: str, group,
                     fn: str) -> None:
    """Every rank calls this with the same `failed` (an all-reduced count)."""
    if failed == 0:
        return
    mine = None
    if error is not None:  # with the notes the rank added (where it failed)
        mine = " ".join([f"{type(error).__name__}: {error}", *getattr(error, "__notes__", ())])
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (dist.get_rank(), mine), group=group)
    failures = {rank: message for rank, message in gathered if message is not None}
    causes = "; ".join(f"rank {rank}: {message}" for rank, message in sorted(failures.items()))
    message = (f"{fn}: {len(failures)} of {len(gathered)} data-parallel rank(s) failed {phase} "
               f"(rank {dist.get_rank()} raises with them) — {causes}")
    raise PeerError(message, failures, phase) from error


def sum_or_fail(values: Optional[Tensor], error: Optional[BaseException], phase: str, *,
                size: int, device, group=None, fn: str = _FN) -> Tensor:
    """The collective of a step that may have failed on some ranks; every rank calls it.

    A rank that succeeded passes ``values`` (``size`` elements) and ``error=None``; one that
    failed passes its exception (``values`` is then ignored). One all-reduce (SUM) of
    [values..., failed] in float64 on ``device``; if any rank failed, every rank raises
    PeerError (naming ``fn``, each failing rank and its cause, and ``phase``), else each gets
    the sum (float64 [size] on ``device``). ``size=0`` is a bare failure flag."""
    reduced = torch.zeros(size + 1, dtype=torch.float64, device=device)
    if error is not None:
        reduced[size] = 1.0
    elif size > 0:
        reduced[:size] = values.reshape(-1).to(reduced)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    _raise_if_failed(float(reduced[size]), error, phase, group, fn)
    return reduced[:size].clone()


def _local_kl_partial(logits: Tensor, kl_policy_logp, kl_reference_logp, kl_num_tokens,
                      kl_logits, kl_targets, kl_offsets, options: dict) -> Tensor:
    """This rank's (S, C) of its KL batch, float64 [2] on the CPU."""
    uses_kl = (options.get("reference_point", "kl_batch") == "kl_batch"
               and options.get("loss_type", "kto") == "kto")
    if not uses_kl:
        return torch.zeros(2, dtype=torch.float64)
    if kl_logits is not None:
        if kl_policy_logp is not None:
            raise ValueError(f"{_FN}: give the KL batch either as kl_logits (with kl_targets) or "
                             "as kl_policy_logp, not both")
        if kl_targets is None:
            raise ValueError(f"{_FN}: argument 'kl_targets' must be given with kl_logits")
        try:
            with torch.no_grad():
                # The options that shape a log-prob, as the target batch gets them.
                shaping = ("average_logprob", "ignore_index", "logit_scale", "logit_softcap",
                           "temperature")
                kl_policy_logp, n = kto_torch.sequence_logprobs(
                    kl_logits.detach(), kl_targets, kl_offsets,
                    **{k: options[k] for k in shaping if k in options})
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"{_FN}: the KL batch (kl_logits, kl_targets) was rejected: {e}") \
                from e
        if kl_num_tokens is None:
            kl_num_tokens = n
    if kl_policy_logp is None or kl_reference_logp is None:
        raise ValueError(f"{_FN}: the KL batch (kl_logits or kl_policy_logp, and "
                         "kl_reference_logp) is needed for reference_point='kl_batch'")
    if kl_num_tokens is None:
        kl_num_tokens = torch.empty((0,), dtype=torch.int64)
    return kto_torch.kl_partial(kl_policy_logp, kl_reference_logp, kl_num_tokens,
                                kl_estimator=options.get("kl_estimator", "mean"))


def kto_loss(logits: Tensor, targets: Tensor, offsets: Optional[Tensor], reference_logp: Tensor,
             desirable: Tensor, kl_policy_logp: Optional[Tensor] = None,
             kl_reference_logp: Optional[Tensor] = None, kl_num_tokens: Optional[Tensor] = None,
             *, kl_logits: Optional[Tensor] = None, kl_targets: Optional[Tensor] = None,
             kl_offsets: Optional[Tensor] = None, group=None,
             **options) -> kto_torch.KTOOutput:
    """kto_torch.kto_loss over a data-parallel group: z0 from the global KL batch, and an
    error on any rank raised on every rank as PeerError (see the module docstring)."""
    if "global_kl" in options:
        raise TypeError(f"{_FN}: 'global_kl' is computed here (the all-reduced KL batch); "
                        "call kto_torch.kto_loss to pass one yourself")
    device = _collective_device(logits)

    partial, error = None, None
    try:
        partial = _local_kl_partial(logits, kl_policy_logp, kl_reference_logp, kl_num_tokens,
                                    kl_logits, kl_targets, kl_offsets, options)
    except Exception as e:  # noqa: BLE001 — carried to every rank below
        error = e
    global_kl = sum_or_fail(partial, error, "before the KL all-reduce", size=2, device=device,
                            group=group)

    out = None
    try:
        out = kto_torch.kto_loss(logits, targets, offsets, reference_logp, desirable,
                                 global_kl=global_kl, **options)
    except Exception as e:  # noqa: BLE001
        error = e
    sum_or_fail(None, error, "in the target batch's step", size=0, device=device, group=group)
    return out
