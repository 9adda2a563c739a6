"""kto_torch's ops, registered with torch.library (namespace ``kto``): their schemas, fake
(meta) kernels, per-device kernels and autograd. The public functions (functional.py) call
them; so may anyone who wants the raw outputs.

Ops: ``kto::sequence_logprobs`` (forward only, for the reference model and the KL batch),
``kto::step_forward`` (loss, metrics and residuals; autograd to the logits),
``kto::step_backward``, ``kto::fused_linear_forward`` (the same loss from hidden states and
the lm_head; its gradients are computed in the forward, chunk by chunk, and scaled by the
incoming gradient in the backward, as Liger's fused losses do) and
``kto::fused_linear_logprobs``. Each has a fake kernel, so ``torch.compile`` traces them
without graph breaks, and one kernel per device: the CPU kernel is the op's body (the
extension copy ``_isa.CPU`` this CPU runs best), the CUDA one ``register_kernel("cuda")``,
so torch's dispatcher, not the extension, picks the backend.

The loss options travel as one float list in the library's order (``OPTION_NAMES``,
``_options``), enums as their codes (``LOSS_TYPES``, ...); the extension checks every
value and names it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C, _isa
from ._errors import KTOError

# ---- the extension's contract (the library's constants, read once: torch.compile traces
# them) ----

METRIC_NAMES = tuple(_C.metric_names())  # the library's names, in its array order
EXAMPLE_OUTPUT_NAMES = tuple(_C.example_output_names())  # rows of the per-example output
# The options every op takes as one float list, in the library's order (kto/options.hpp).
OPTION_NAMES = tuple(_C.option_names())
# The fused step's default chunk budget on each device (is_cuda → bytes).
DEFAULT_CHUNK_BYTES = {False: _C.default_chunk_bytes(False), True: _C.default_chunk_bytes(True)}

# The named options' values, name → code: the library's tables (kto::option_choices).
_ENUMS = {name: {value: code for code, value in enumerate(values)}
          for name, values in _C.option_choices().items()}
LOSS_TYPES = _ENUMS["loss_type"]
LINKS = _ENUMS["link"]
REFERENCE_POINTS = _ENUMS["reference_point"]
KL_ESTIMATORS = _ENUMS["kl_estimator"]
REDUCTIONS = _ENUMS["reduction"]
STRATEGIES = {name: code for code, name in enumerate(_C.strategy_names())}  # kto::FusedStrategy

_DEFAULT_OPTIONS = dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto",
                        link="one_minus_sigmoid", reference_point="kl_batch",
                        kl_estimator="mean", clamp_kl=True, fixed_z0=0.0, average_logprob=False,
                        reduction="mean", mean_denominator=0, ignore_index=-100,
                        token_statistics=False, logit_scale=1.0, logit_softcap=0.0,
                        temperature=1.0)
assert set(_DEFAULT_OPTIONS) == set(OPTION_NAMES), "kto_torch and its extension disagree"


def _lookup(table: dict, name: str, value, fn: str = "kto_torch") -> int:
    """The code of an enum option given by name; anything else raises, naming `fn`."""
    if not isinstance(value, str) or value not in table:
        error = KTOError(f"{fn}: argument '{name}' must be one of {sorted(table)}; got "
                         f"{value!r}")
        error.function, error.argument = fn, name
        raise error
    return table[value]


def _options(fn: str = "kto_torch", **given) -> list:
    """The ops' options list: the library's names in its order, enums as their codes."""
    merged = {**_DEFAULT_OPTIONS, **given}
    values = []
    for name in OPTION_NAMES:
        value = merged[name]
        if name in _ENUMS:
            value = _lookup(_ENUMS[name], name, value, fn)
        values.append(float(value))
    return values


# ---- helpers of the fake kernels ----

def _rows(logits: Tensor) -> int:
    return logits.shape[0] if logits.dim() == 2 else logits.shape[0] * logits.shape[1]


def _accumulation(logits: Tensor) -> torch.dtype:
    """The dtype the ops return per-sequence values in: float64 for float64 inputs, else
    float32 (the library's accumulation type)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _check_devices(fn: str, anchor_name: str, anchor: Tensor, same=(), or_cpu=()) -> None:
    """The device rule of every op (the C++ kernels check it too; the fake kernels, which
    also serve meta tensors, check it here): `same` on the anchor's device, `or_cpu` there
    or on the CPU."""
    for name, t in same:
        if t.device != anchor.device:
            raise ValueError(f"{fn}: argument '{name}' must be on {anchor.device} like "
                             f"'{anchor_name}'; got {t.device}")
    for name, t in or_cpu:
        if t.device != anchor.device and t.device.type != "cpu":
            raise ValueError(f"{fn}: argument '{name}' must be on {anchor.device} like "
                             f"'{anchor_name}' (or on the CPU); got {t.device}")


def _given_pairs(**tensors) -> list:
    """(name, tensor) for each optional operand that was given."""
    return [(name, t) for name, t in tensors.items() if t is not None]


def _token_statistics_like(like: Tensor, b: int, options: list) -> Tensor:
    """Each sequence's sums of its scored tokens' entropy (row 0) and mean logit (row 1),
    float64 on `like`'s device: [2, B], or [2, 0] when not requested."""
    requested = options[OPTION_NAMES.index("token_statistics")] != 0
    return torch.empty((2, b if requested else 0), dtype=torch.float64, device=like.device)


def _tuple(out):
    return tuple(out) if isinstance(out, list) else out


def _per_device(op, name: str):
    """Registers the op's CUDA kernel (the CPU one is the custom op's own body): each calls
    the extension's entry point for its backend, chosen by torch's dispatcher."""
    cuda = getattr(_C, name + "_cuda")
    op.register_kernel("cuda")(lambda *args: _tuple(cuda(*args)))


# ---- kto::sequence_logprobs ----

@torch.library.custom_op("kto::sequence_logprobs", mutates_args=(), device_types="cpu")
def _sequence_logprobs(
    logits: Tensor, targets: Tensor, offsets: Tensor, options: list[float]
) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_isa.CPU.sequence_logprobs_cpu(logits, targets, offsets, options))


_per_device(_sequence_logprobs, "sequence_logprobs")


@_sequence_logprobs.register_fake
def _(logits, targets, offsets, options):
    _check_devices("kto_torch.sequence_logprobs", "logits", logits, [("targets", targets)],
                   [("offsets", offsets)])
    b = offsets.shape[0] - 1
    acc = _accumulation(logits)
    return (
        logits.new_empty((b,), dtype=acc),
        logits.new_empty((b,), dtype=torch.int64),
        logits.new_empty((_rows(logits),), dtype=acc),
    )


# ---- kto::step_forward, kto::step_backward ----

@torch.library.custom_op("kto::step_forward", mutates_args=(), device_types="cpu")
def _step_forward(
    logits: Tensor,
    targets: Tensor,
    offsets: Tensor,
    reference_logp: Tensor,
    desirable: Tensor,
    kl_policy_logp: Optional[Tensor],
    kl_reference_logp: Optional[Tensor],
    kl_num_tokens: Optional[Tensor],
    global_kl: Optional[Tensor],
    options: list[float],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(_isa.CPU.step_forward_cpu(
        logits, targets, offsets, reference_logp, desirable, kl_policy_logp, kl_reference_logp,
        kl_num_tokens, global_kl, options))


_per_device(_step_forward, "step_forward")


@_step_forward.register_fake
def _(logits, targets, offsets, reference_logp, desirable, kl_policy_logp, kl_reference_logp,
      kl_num_tokens, global_kl, *args):
    _check_devices("kto_torch.kto_loss", "logits", logits, [("targets", targets)],
                   _given_pairs(offsets=offsets, reference_logp=reference_logp,
                                desirable=desirable, kl_policy_logp=kl_policy_logp,
                                kl_reference_logp=kl_reference_logp, kl_num_tokens=kl_num_tokens,
                                global_kl=global_kl))
    b = offsets.shape[0] - 1
    acc = _accumulation(logits)
    return (
        logits.new_empty((len(METRIC_NAMES),), dtype=torch.float64),
        logits.new_empty((len(EXAMPLE_OUTPUT_NAMES), b), dtype=acc),
        logits.new_empty((b,), dtype=torch.int64),
        logits.new_empty((_rows(logits),), dtype=acc),
        _token_statistics_like(logits, b, args[-1]),
    )


@torch.library.custom_op("kto::step_backward", mutates_args=(), device_types="cpu")
def _step_backward(
    logits: Tensor,
    targets: Tensor,
    offsets: Tensor,
    row_lse: Tensor,
    grad_logp: Tensor,
    num_tokens: Tensor,
    options: list[float],
) -> Tensor:
    return _isa.CPU.step_backward_cpu(logits, targets, offsets, row_lse, grad_logp, num_tokens,
                                      options)


_per_device(_step_backward, "step_backward")


@_step_backward.register_fake
def _(logits, targets, offsets, row_lse, grad_logp, num_tokens, *args):
    _check_devices("kto_torch.kto_loss (backward)", "logits", logits, [("targets", targets)],
                   [("offsets", offsets), ("row_lse", row_lse), ("grad_logp", grad_logp),
                    ("num_tokens", num_tokens)])
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, targets, offsets = inputs[0], inputs[1], inputs[2]
    _, per_example, n, lse, _ = output
    grad_logp = per_example[EXAMPLE_OUTPUT_NAMES.index("grad_logp")]
    ctx.save_for_backward(logits, targets, offsets, lse, grad_logp, n)
    ctx.options = inputs[9]


def _backward(ctx, g_metrics, g_per_example, g_num_tokens, g_lse, g_token_statistics):
    logits, targets, offsets, lse, grad_logp, n = ctx.saved_tensors
    # Only the loss (metrics[0]) is differentiable: dL_total/dlogp_s = g · g_s.
    scaled = grad_logp * g_metrics[0].to(grad_logp.dtype)
    dlogits = torch.ops.kto.step_backward(logits, targets, offsets, lse, scaled, n, ctx.options)
    return (dlogits,) + (None,) * 9


torch.library.register_autograd("kto::step_forward", _backward, setup_context=_setup_context)


# ---- kto::fused_linear_forward, kto::fused_linear_logprobs ----

@torch.library.custom_op("kto::fused_linear_forward", mutates_args=(), device_types="cpu")
def _fused_linear_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    offsets: Tensor,
    reference_logp: Tensor,
    desirable: Tensor,
    kl_policy_logp: Optional[Tensor],
    kl_reference_logp: Optional[Tensor],
    kl_num_tokens: Optional[Tensor],
    global_kl: Optional[Tensor],
    options: list[float],
    chunk_bytes: int,
    strategy: int,
    weight_grad: bool = True,
    bias_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # hidden [N, D] or [B, T, D] (dL/dhidden comes back in its shape). The KL batch is given
    # as in step_forward: its log-probs, or an all-reduced (S, C). weight_grad / bias_grad
    # False (a frozen head, e.g. LoRA's lm_head): dW / db are not computed and come back
    # empty ([0, D] / [0]); dH and the loss are bit for bit the same.
    return tuple(_isa.CPU.fused_linear_forward_cpu(
        hidden, weight, bias, targets, offsets, reference_logp, desirable, kl_policy_logp,
        kl_reference_logp, kl_num_tokens, global_kl, options, chunk_bytes, strategy,
        weight_grad, bias_grad))


@_fused_linear_forward.register_kernel("cuda")
def _(*args):
    # The dispatcher drops trailing arguments equal to their defaults (weight_grad,
    # bias_grad = True): the extension's entry point takes them all.
    return _tuple(_C.fused_linear_forward_cuda(*args, *(True, True)[len(args) - 14:]))


@_fused_linear_forward.register_fake
def _(hidden, weight, bias, targets, offsets, reference_logp, desirable, kl_policy_logp,
      kl_reference_logp, kl_num_tokens, global_kl, *args):
    _check_devices("kto_torch.fused_linear_kto_loss", "hidden", hidden,
                   _given_pairs(weight=weight, bias=bias, targets=targets),
                   _given_pairs(offsets=offsets, reference_logp=reference_logp,
                                desirable=desirable, kl_policy_logp=kl_policy_logp,
                                kl_reference_logp=kl_reference_logp, kl_num_tokens=kl_num_tokens,
                                global_kl=global_kl))
    b = offsets.shape[0] - 1
    acc = _accumulation(hidden)
    # vocab_blocks writes dW in the weight's dtype when it is hidden's (the op's rule).
    strategy = args[2]
    weight_grad = args[3] if len(args) > 3 else True
    bias_grad = args[4] if len(args) > 4 else True
    dw_dtype = (weight.dtype if strategy == STRATEGIES["vocab_blocks"]
                and weight.dtype == hidden.dtype else acc)
    return (
        hidden.new_empty((len(METRIC_NAMES),), dtype=torch.float64),
        hidden.new_empty((len(EXAMPLE_OUTPUT_NAMES), b), dtype=acc),
        hidden.new_empty((b,), dtype=torch.int64),
        hidden.new_empty(hidden.shape, dtype=acc),
        hidden.new_empty(weight.shape if weight_grad else (0, weight.shape[1]), dtype=dw_dtype),
        hidden.new_empty(bias.shape if bias is not None and bias_grad else (0,), dtype=acc),
        _token_statistics_like(hidden, b, args[0]),
    )


def _fused_setup_context(ctx, inputs, output):
    hidden, weight, bias = inputs[0], inputs[1], inputs[2]
    _, _, _, dh, dw, db, _ = output
    ctx.save_for_backward(dh, dw, db)
    ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
    ctx.has_bias = bias is not None and bias.numel() > 0
    # A frozen head: the op computed no dW (db) and the parameter gets no gradient.
    ctx.weight_grad = inputs[14] if len(inputs) > 14 else True
    ctx.has_bias = ctx.has_bias and (inputs[15] if len(inputs) > 15 else True)


def _scaled(grad: Tensor, g: Tensor, dtype: torch.dtype) -> Tensor:
    # The op's gradient in the parameter's dtype, times the incoming gradient g. When g is
    # 1 (loss.backward()) and the dtype is already the parameter's, the op's own tensor is
    # handed over: no second V x D array at the backward's peak (one host read of g: a
    # device sync on CUDA, where the forward has synced already). Otherwise the cast is
    # scaled in place, never the op's outputs. Traced (torch.compile, opcheck: tensors are
    # subclasses such as FunctionalTensor, and g has no value), out of place.
    traced = torch.compiler.is_compiling() or type(grad) is not torch.Tensor
    out = grad.to(dtype)
    if traced:
        return out * g.to(dtype)
    if out is grad:
        return grad if bool(g == 1) else grad * g.to(dtype)
    return out.mul_(g.to(dtype))


def _fused_backward(ctx, g_metrics, g_per_example, g_n, g_dh, g_dw, g_db, g_token_statistics):
    dh, dw, db = ctx.saved_tensors
    g = g_metrics[0]
    grads = (
        _scaled(dh, g, ctx.dtypes[0]),
        _scaled(dw, g, ctx.dtypes[1]) if ctx.weight_grad else None,
        _scaled(db, g, ctx.dtypes[2]) if ctx.has_bias else None,
    )
    return grads + (None,) * 13


torch.library.register_autograd("kto::fused_linear_forward", _fused_backward,
                                setup_context=_fused_setup_context)


@torch.library.custom_op("kto::fused_linear_logprobs", mutates_args=(), device_types="cpu")
def _fused_linear_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                           offsets: Tensor, options: list[float],
                           chunk_bytes: int) -> tuple[Tensor, Tensor]:
    return tuple(_isa.CPU.fused_linear_logprobs_cpu(hidden, weight, bias, targets, offsets,
                                                    options, chunk_bytes))


_per_device(_fused_linear_logprobs, "fused_linear_logprobs")


@_fused_linear_logprobs.register_fake
def _(hidden, weight, bias, targets, offsets, *args):
    _check_devices("kto_torch.fused_linear_logprobs", "hidden", hidden,
                   _given_pairs(weight=weight, bias=bias, targets=targets), [("offsets", offsets)])
    b = offsets.shape[0] - 1
    return (hidden.new_empty((b,), dtype=_accumulation(hidden)),
            hidden.new_empty((b,), dtype=torch.int64))
