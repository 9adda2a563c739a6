"""kto_torch's public functions: the KTO loss from logits (``kto_loss``) or from hidden
states and the lm_head (``fused_linear_kto_loss``), forward-only log-probs
(``sequence_logprobs``, ``fused_linear_logprobs``) and the data-parallel pieces
(``kl_partial``, ``reference_point``). Each checks its arguments and calls one op of
_ops.py.

Shared conventions (docs/integrations.md, "PyTorch"):

* Logits: [rows, V] or [B, T, V]; hidden states: [N, D] or [B, T, D]; float32, float64,
  bfloat16 or float16 on the CPU, float32, bfloat16 or float16 on CUDA. Strides are read as
  they are (``logits[:, :-1]``, ``expand``); a layout the library cannot read in place is
  copied first. Gradients are new contiguous tensors.
* Targets: int64 (or int32) token ids, one per row ([rows], or [B, T] beside [B, T, V]
  logits or [B, T, D] hidden states), ``ignore_index`` where a row is not scored.
* Sequences: CSR ``offsets`` over the rows (B + 1 integers); None for [B, T, ...] inputs
  means padded sequences of T rows each.
* The KL batch, on both loss functions: its per-sequence log-probs ``kl_policy_logp``,
  ``kl_reference_logp`` (and ``kl_num_tokens``), from ``sequence_logprobs`` or
  ``fused_linear_logprobs`` under ``torch.no_grad()``; or, under data parallel, the
  all-reduced ``global_kl`` of ``kl_partial``. It never receives a gradient.
* Devices: the logits (hidden states) decide. Targets, weight and bias must be on their
  device; the small per-sequence tensors may also be on the CPU.
* Dtypes of the results: per-sequence outputs and the loss in the accumulation type,
  float32 (float64 for float64 inputs); the metrics float64.
* Errors: kto_torch.KTOError (a ValueError) naming the function, the argument (indices in
  the argument's own shape), the expectation and what came; NonFiniteLogitsError for
  NaN/inf logits; a module or other non-tensor where a tensor belongs: a TypeError (also a
  KTOError).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _C, _isa
from ._errors import KTOError, KTOTypeError
from ._ops import (
    DEFAULT_CHUNK_BYTES,
    EXAMPLE_OUTPUT_NAMES,
    KL_ESTIMATORS,
    METRIC_NAMES,
    OPTION_NAMES,
    STRATEGIES,
    _accumulation,
    _lookup,
    _options,
)

__all__ = ["KTOOutput", "fused_linear_kto_loss", "fused_linear_logprobs", "kl_partial",
           "kto_loss", "reference_point", "release_scratch", "sequence_logprobs"]


class KTOOutput(NamedTuple):
    """What kto_loss and fused_linear_kto_loss return.

    ``loss``: the batch loss, a 0-d tensor in the accumulation type (float32; float64 for
    float64 inputs; computed in float64 inside), differentiable w.r.t. the logits (the
    hidden states, weight and bias). ``metrics``: TRL's names (``METRIC_NAMES``: loss, kl,
    rewards/chosen, ...) → detached float64 0-d tensors. Per example ([B], detached, in the
    accumulation type): ``logp`` (the policy's sequence log-prob), ``ratio``
    (ρ = logp − reference_logp), ``reward`` (βρ), ``example_loss`` (before the reduction),
    ``grad_logp`` (∂loss/∂logp); ``num_tokens`` (int64, scored rows per sequence). With
    ``token_statistics=True``, per example (float64, on the logits' device): the sums over
    its scored tokens of each token's entropy (``entropy_sum``) and of its mean logit
    (``mean_logit_sum``), from the pass that computes the log-softmax; None otherwise.
    TRL's ``entropy`` and ``logits/*`` metrics divide them by token counts."""

    loss: Tensor
    metrics: dict
    logp: Tensor
    ratio: Tensor
    reward: Tensor
    example_loss: Tensor
    grad_logp: Tensor
    num_tokens: Tensor
    entropy_sum: Optional[Tensor] = None
    mean_logit_sum: Optional[Tensor] = None


# ---- argument checks of the Python layer (the extension checks the rest) ----

def _fail(error_class, fn: str, name: str, message: str):
    error = error_class(f"{fn}: argument '{name}' {message}")
    error.function, error.argument = fn, name
    raise error


def _tensors(fn: str, **arguments) -> None:
    """Each argument a tensor (None where it may be absent: the caller passes only what it
    was given). A module where a tensor belongs (``lm_head`` for ``lm_head.weight``) is
    refused by name, as is anything else that is not a tensor."""
    for name, value in arguments.items():
        if value is None or isinstance(value, Tensor):
            continue
        if isinstance(value, torch.nn.Module):
            hint = ""
            if name in ("weight", "bias") and isinstance(getattr(value, name, None), Tensor):
                hint = f": pass its parameter (lm_head.{name}), not the module"
            _fail(KTOTypeError, fn, name,
                  f"must be a tensor; got the module {type(value).__name__}{hint}")
        _fail(KTOTypeError, fn, name, f"must be a tensor; got {type(value).__name__}")


def _padded_offsets(fn: str, name: str, x: Tensor) -> Tensor:
    """CSR offsets of padded sequences for [B, T, ...] inputs (offsets=None)."""
    shapes = "[rows, V] or [B, T, V]" if name == "logits" else "[N, D] or [B, T, D]"
    if x.dim() not in (2, 3):
        _fail(KTOError, fn, name, f"must be {shapes}; got {x.dim()} dims (shape "
                                  f"{list(x.shape)})")
    if x.dim() == 2:
        _fail(KTOError, fn, "offsets",
              f"must be given for {name} that are not {shapes.split(' or ')[1]} (padded "
              f"sequences); got None with {name} of shape {list(x.shape)}")
    b, t = x.shape[0], x.shape[1]
    return torch.arange(b + 1, dtype=torch.int64) * t


def _given(fn: str, name: str, t: Optional[Tensor], expectation: str) -> None:
    """An optional tensor passed explicitly must not be empty: inside the ops an empty
    tensor means "absent", which only None may say."""
    if t is not None and t.numel() == 0:
        _fail(KTOError, fn, name, f"must {expectation} (or be None); got an empty tensor of "
                                  f"shape {list(t.shape)}")


def _vocab(weight: Tensor):
    return weight.shape[0] if weight.dim() == 2 else "weight.size(0)"


def _global_kl(fn: str, global_kl: Optional[Tensor]) -> None:
    if global_kl is not None and (global_kl.dim() != 1 or global_kl.numel() != 2):
        _fail(KTOError, fn, "global_kl", "must hold the all-reduced (S, C): 1-D with 2 "
                                         f"elements (or be None); got shape "
                                         f"{list(global_kl.shape)}")


def _chunk_bytes(hidden: Tensor, chunk_bytes: Optional[int]) -> int:
    """The chunk budget: the caller's, or the library's default for hidden's device
    (kto::kDefaultCpuChunkBytes, kDefaultCudaChunkBytes: each measured on its device)."""
    if chunk_bytes is None:
        return DEFAULT_CHUNK_BYTES[hidden.is_cuda]
    return int(chunk_bytes)


def _loss_options(fn: str, *values) -> list:
    """The options list from a loss function's option arguments, given in the library's
    order (OPTION_NAMES)."""
    return _options(fn, **dict(zip(OPTION_NAMES, values, strict=True)))


def _kto_output(anchor: Tensor, metrics: Tensor, per_example: Tensor, n: Tensor,
                token_statistics: Optional[Tensor]) -> KTOOutput:
    detached = metrics.detach()
    requested = token_statistics is not None
    return KTOOutput(
        # The library computes the loss in float64; it is returned in the accumulation type
        # of the logits (hidden states), as the per-example outputs.
        loss=metrics[0].to(_accumulation(anchor)),
        metrics={name: detached[i] for i, name in enumerate(METRIC_NAMES)},
        **{field: per_example[EXAMPLE_OUTPUT_NAMES.index(name)].detach()
           for field, name in (("logp", "logp"), ("ratio", "ratio"), ("reward", "reward"),
                               ("example_loss", "loss"), ("grad_logp", "grad_logp"))},
        num_tokens=n,
        entropy_sum=token_statistics[0] if requested else None,
        mean_logit_sum=token_statistics[1] if requested else None,
    )


_OPTION_ARGUMENTS = """
    Loss options (keyword only; docs/math.md):
        beta: β > 0, the sharpness of the sigmoid (TRL's beta).
        desirable_weight, undesirable_weight: λ_D, λ_U >= 0, the weights of each side.
        loss_type: "kto" (default) or "apo_zero_unpaired".
        link: "one_minus_sigmoid" (1 − σ, TRL's) or "neg_log_sigmoid" (−log σ).
        reference_point: "kl_batch" (z0 from the KL batch, default), "fixed" (z0 =
            fixed_z0) or "zero".
        kl_estimator: "mean" (TRL's: every KL sequence counts) or "nonempty_mean" (only
            those with a scored token).
        clamp_kl: z0 = max(0, S / C) (default) or S / C.
        fixed_z0: z0 with reference_point="fixed".
        average_logprob: a sequence's log-prob is the mean over its scored tokens instead
            of the sum.
        reduction: "mean" over the B target sequences (default) or "sum".
        mean_denominator: with reduction="mean", divide by this instead of B (0: B), e.g.
            the global batch size where gradients are summed across ranks.
        ignore_index: the target id of rows that are not scored (-100).
        token_statistics: also each sequence's sums of its tokens' entropy and mean logit
            (KTOOutput.entropy_sum, mean_logit_sum), from the same pass.
        logit_scale a, logit_softcap c (0: off), temperature τ: the logits are taken as
            z' = c·tanh(a·z / c) / τ (a·z / τ uncapped) before the log-softmax, as models
            with a scaled or soft-capped head do; the gradient is to the raw z."""

_LOGPROB_OPTIONS = """
        average_logprob, ignore_index, logit_scale, logit_softcap, temperature: as in
            kto_loss (keyword only)."""


def _documented(f):
    """Fills the shared parts of a docstring: {loss options}, {log-prob options}."""
    f.__doc__ = (f.__doc__.replace("\n\n    {loss options}", "\n" + _OPTION_ARGUMENTS)
                 .replace("\n        {log-prob options}", _LOGPROB_OPTIONS))
    return f


@_documented
def sequence_logprobs(logits: Tensor, targets: Tensor, offsets: Optional[Tensor] = None, *,
                      average_logprob: bool = False, ignore_index: int = -100,
                      logit_scale: float = 1.0, logit_softcap: float = 0.0,
                      temperature: float = 1.0):
    """Each sequence's log-prob and scored-token count from the logits, forward only (for
    the reference model and the KL batch: no gradient flows through).

    Args:
        logits: [rows, V] or [B, T, V].
        targets: token ids, [rows] or [B, T]; ignore_index where not scored.
        offsets: CSR offsets over the rows (B + 1 integers); None for [B, T, V] logits
            (padded sequences).
        {log-prob options}

    Returns:
        (logp [B] in the accumulation type, num_tokens [B] int64).
    """
    fn = "kto_torch.sequence_logprobs"
    _tensors(fn, logits=logits, targets=targets, offsets=offsets)
    if offsets is None:
        offsets = _padded_offsets(fn, "logits", logits)
    logp, n, _ = torch.ops.kto.sequence_logprobs(
        logits, targets, offsets,
        _options(fn, average_logprob=average_logprob, ignore_index=ignore_index,
                 logit_scale=logit_scale, logit_softcap=logit_softcap, temperature=temperature))
    return logp, n


def kl_partial(kl_policy_logp: Tensor, kl_reference_logp: Tensor, kl_num_tokens: Tensor, *,
               kl_estimator: str = "mean") -> Tensor:
    """The local (S, C) of a KL batch, float64 [2] on the CPU: all-reduce it (SUM), then pass
    it to kto_loss(global_kl=...) or fused_linear_kto_loss(global_kl=...) on every rank.

    Args:
        kl_policy_logp: the policy's log-prob of each KL sequence, [K].
        kl_reference_logp: the reference model's, [K].
        kl_num_tokens: scored tokens per KL sequence, [K] integers (needed for
            "nonempty_mean"; may be empty for "mean").
        kl_estimator: "mean" (C = K) or "nonempty_mean" (C counts sequences with a scored
            token).
    """
    fn = "kto_torch.kl_partial"
    _tensors(fn, kl_policy_logp=kl_policy_logp, kl_reference_logp=kl_reference_logp,
             kl_num_tokens=kl_num_tokens)
    return _C.kl_partial(kl_policy_logp, kl_reference_logp, kl_num_tokens,
                         _lookup(KL_ESTIMATORS, "kl_estimator", kl_estimator, fn))


def reference_point(global_kl: Tensor, *, clamp_kl: bool = True) -> float:
    """z0 of an all-reduced (S, C): S / C, clamped at 0 unless clamp_kl is False (0 if C = 0).

    Args:
        global_kl: the all-reduced (S, C) of kl_partial, 2 elements.
        clamp_kl: max(0, S / C) (default) or S / C.

    Returns a float: pass it as ``reference_point="fixed", fixed_z0=z0`` where a loss should
    not see the KL batch itself."""
    fn = "kto_torch.reference_point"
    _tensors(fn, global_kl=global_kl)
    return _C.reference_point(global_kl, bool(clamp_kl))


def release_scratch() -> None:
    """Frees the chunk buffers the CPU fused ops keep in the calling thread between calls
    (at most the chunk budget per role; kto::cpu::release_scratch)."""
    _isa.CPU.release_scratch()


@_documented
def kto_loss(
    logits: Tensor,
    targets: Tensor,
    offsets: Optional[Tensor],
    reference_logp: Tensor,
    desirable: Tensor,
    kl_policy_logp: Optional[Tensor] = None,
    kl_reference_logp: Optional[Tensor] = None,
    kl_num_tokens: Optional[Tensor] = None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    link: str = "one_minus_sigmoid",
    reference_point: str = "kl_batch",
    kl_estimator: str = "mean",
    clamp_kl: bool = True,
    fixed_z0: float = 0.0,
    average_logprob: bool = False,
    reduction: str = "mean",
    mean_denominator: int = 0,
    ignore_index: int = -100,
    global_kl: Optional[Tensor] = None,
    token_statistics: bool = False,
    logit_scale: float = 1.0,
    logit_softcap: float = 0.0,
    temperature: float = 1.0,
) -> KTOOutput:
    """The KTO loss of a target batch from the policy's logits, with TRL's metrics.

    Args:
        logits: the policy's logits of the target batch, [rows, V] or [B, T, V]
            (differentiable: ``loss.backward()`` reaches them).
        targets: token ids, [rows] or [B, T]; ignore_index where not scored.
        offsets: CSR offsets over the rows (B + 1 integers); None for [B, T, V] logits
            (padded sequences).
        reference_logp: the reference model's log-prob of each target sequence, [B].
        desirable: each sequence's label, [B]: bool, or integers/floats equal to 0 or 1.
        kl_policy_logp: the KL batch (reference_point="kl_batch"): the policy's log-prob of
            each KL sequence, [K] (sequence_logprobs of its logits, under no_grad).
        kl_reference_logp: the reference model's log-prob of each KL sequence, [K].
        kl_num_tokens: scored tokens per KL sequence, [K] integers (for
            kl_estimator="nonempty_mean").
        global_kl: instead of the KL batch, an all-reduced (S, C) from kl_partial (1-D, 2
            elements; keyword only).

    {loss options}

    Returns:
        KTOOutput: the loss (0-d, float32; float64 for float64 logits), the metrics, the
        per-sequence outputs.
    """
    fn = "kto_torch.kto_loss"
    _tensors(fn, logits=logits, targets=targets, offsets=offsets, reference_logp=reference_logp,
             desirable=desirable, kl_policy_logp=kl_policy_logp,
             kl_reference_logp=kl_reference_logp, kl_num_tokens=kl_num_tokens,
             global_kl=global_kl)
    options = _loss_options(fn, beta, desirable_weight, undesirable_weight, loss_type, link,
                            reference_point, kl_estimator, clamp_kl, fixed_z0, average_logprob,
                            reduction, mean_denominator, ignore_index, token_statistics,
                            logit_scale, logit_softcap, temperature)
    if offsets is None:
        offsets = _padded_offsets(fn, "logits", logits)
    _global_kl(fn, global_kl)
    metrics, per_example, n, _, statistics = torch.ops.kto.step_forward(
        logits, targets, offsets, reference_logp, desirable, kl_policy_logp, kl_reference_logp,
        kl_num_tokens, global_kl, options)
    return _kto_output(logits, metrics, per_example, n, statistics if token_statistics else None)


@_documented
def fused_linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor,
                          offsets: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
                          average_logprob: bool = False, ignore_index: int = -100,
                          chunk_bytes: Optional[int] = None, logit_scale: float = 1.0,
                          logit_softcap: float = 0.0, temperature: float = 1.0):
    """Each sequence's log-prob and scored-token count from hidden states and the lm_head,
    forward only (the reference model, the KL batch), the logits never materialised.

    Args:
        hidden: the last hidden states, [N, D] or [B, T, D].
        weight: the lm_head's weight [V, D] (``lm_head.weight``; logits = hidden @ weight.T
            + bias).
        targets: token ids, [N] or [B, T]; ignore_index where not scored.
        offsets: CSR offsets over the rows (B + 1 integers); None for [B, T, D] hidden
            states (padded sequences).
        bias: the lm_head's bias [V], or None.
        chunk_bytes: the budget of one chunk of logits (None: the library's default for the
            device).
        {log-prob options}

    Returns:
        (logp [B] in the accumulation type, num_tokens [B] int64).
    """
    fn = "kto_torch.fused_linear_logprobs"
    _tensors(fn, hidden=hidden, weight=weight, targets=targets, offsets=offsets, bias=bias)
    _given(fn, "bias", bias, f"have V = weight.size(0) = {_vocab(weight)} entries")
    if offsets is None:
        offsets = _padded_offsets(fn, "hidden", hidden)
    return torch.ops.kto.fused_linear_logprobs(
        hidden, weight, bias, targets, offsets,
        _options(fn, average_logprob=average_logprob, ignore_index=ignore_index,
                 logit_scale=logit_scale, logit_softcap=logit_softcap, temperature=temperature),
        _chunk_bytes(hidden, chunk_bytes))


@_documented
def fused_linear_kto_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    offsets: Optional[Tensor],
    reference_logp: Tensor,
    desirable: Tensor,
    bias: Optional[Tensor] = None,
    *,
    kl_policy_logp: Optional[Tensor] = None,
    kl_reference_logp: Optional[Tensor] = None,
    kl_num_tokens: Optional[Tensor] = None,
    global_kl: Optional[Tensor] = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    link: str = "one_minus_sigmoid",
    reference_point: str = "kl_batch",
    kl_estimator: str = "mean",
    clamp_kl: bool = True,
    fixed_z0: float = 0.0,
    average_logprob: bool = False,
    reduction: str = "mean",
    mean_denominator: int = 0,
    ignore_index: int = -100,
    chunk_bytes: Optional[int] = None,
    strategy: str = "keep_chunk",
    token_statistics: bool = False,
    logit_scale: float = 1.0,
    logit_softcap: float = 0.0,
    temperature: float = 1.0,
) -> KTOOutput:
    """The KTO loss from the last hidden states and the lm_head (logits = hidden @ weight.T
    + bias, never materialised), with TRL's metrics; ``loss.backward()`` reaches hidden,
    weight and bias.

    Args:
        hidden: the policy's last hidden states of the target batch, [N, D] or [B, T, D].
        weight: the lm_head's weight, [V, D] as ``nn.Linear(D, V).weight`` holds it (pass
            ``lm_head.weight``, not the module or its transpose); hidden's dtype, or float32
            under mixed precision (bfloat16/float16 hidden states): the GEMMs then read a
            copy in hidden's dtype and the head's gradients are the fp32 sums, unrounded.
        targets: token ids, [N] or [B, T]; ignore_index where not scored.
        offsets: CSR offsets over the rows (B + 1 integers); None for [B, T, D] hidden
            states (padded sequences).
        reference_logp: the reference model's log-prob of each target sequence, [B].
        desirable: each sequence's label, [B]: bool, or integers/floats equal to 0 or 1.
        bias: the lm_head's bias [V] (weight's dtype), or None.
        kl_policy_logp, kl_reference_logp, kl_num_tokens, global_kl: the KL batch as kto_loss
            takes it (keyword only): its log-probs (fused_linear_logprobs of its hidden
            states, under no_grad) or an all-reduced (S, C).
        chunk_bytes: the budget of one chunk of logits (None: the library's default for the
            device, kto::kDefaultCpuChunkBytes or kDefaultCudaChunkBytes).
        strategy: "keep_chunk" (3 GEMMs a row) or "recompute" (4, the logits recomputed for
            the backward), both summing dW over row chunks in an fp32 [V, D] array; on CUDA
            also "vocab_blocks" (4): the backward by blocks of vocabulary columns over all
            rows at once, each block of dW one GEMM's fp32 sum written once in the weight's
            dtype (no fp32 [V, D] array; room for a copy of hidden and an fp32 [N, D] array
            instead).

    {loss options}

    Extra memory: one chunk of logits of at most ``chunk_bytes`` plus the fp32 gradients.
    Layouts: hidden states and weight are read with their strides when their rows are at
    least D elements apart with unit stride along D; any other layout is copied to a
    contiguous tensor first, and the gradient still reaches the original tensor. A frozen
    head (weight, and bias, with requires_grad=False, as under LoRA; or grad mode off): no
    dW (db) is computed, on the CPU no fp32 [V, D] array either; dH and the loss are bit
    for bit the same.

    Returns:
        KTOOutput, as kto_loss's (the loss float32; float64 for float64 hidden states).
    """
    fn = "kto_torch.fused_linear_kto_loss"
    _tensors(fn, hidden=hidden, weight=weight, targets=targets, offsets=offsets,
             reference_logp=reference_logp, desirable=desirable, bias=bias,
             kl_policy_logp=kl_policy_logp, kl_reference_logp=kl_reference_logp,
             kl_num_tokens=kl_num_tokens, global_kl=global_kl)
    options = _loss_options(fn, beta, desirable_weight, undesirable_weight, loss_type, link,
                            reference_point, kl_estimator, clamp_kl, fixed_z0, average_logprob,
                            reduction, mean_denominator, ignore_index, token_statistics,
                            logit_scale, logit_softcap, temperature)
    _given(fn, "bias", bias, f"have V = weight.size(0) = {_vocab(weight)} entries")
    if offsets is None:
        offsets = _padded_offsets(fn, "hidden", hidden)
    _global_kl(fn, global_kl)
    code = _lookup(STRATEGIES, "strategy", strategy, fn)
    if code == STRATEGIES["vocab_blocks"] and hidden.device.type != "cuda":
        _fail(KTOError, fn, "strategy", f"must be 'keep_chunk' or 'recompute' on "
                                        f"{hidden.device.type} ('vocab_blocks' runs on CUDA "
                                        "only); got 'vocab_blocks'")
    # A frozen head (LoRA's lm_head; weight and bias needing no gradient): no dW / db.
    grad = torch.is_grad_enabled()
    weight_grad = grad and weight.requires_grad
    bias_grad = grad and bias is not None and bias.requires_grad
    metrics, per_example, n, _, _, _, statistics = torch.ops.kto.fused_linear_forward(
        hidden, weight, bias, targets, offsets, reference_logp, desirable, kl_policy_logp,
        kl_reference_logp, kl_num_tokens, global_kl, options, _chunk_bytes(hidden, chunk_bytes),
        code, weight_grad, bias_grad)
    return _kto_output(hidden, metrics, per_example, n, statistics if token_statistics else None)
