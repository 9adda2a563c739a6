"""kto for PyTorch: KTO loss ops registered with torch.library.

    import kto_torch
    out = kto_torch.kto_loss(logits, targets, offsets, reference_logp, desirable,
                             kl_policy_logp, kl_reference_logp, kl_num_tokens, beta=0.1)
    out.loss.backward()          # dL/dlogits from the library's one-pass backward

Ops (namespace ``kto``): ``kto::sequence_logprobs`` (forward only, for the
reference model and the KL batch), ``kto::step_forward`` (loss, metrics and
residuals; autograd to the logits) and ``kto::step_backward``. Each has a fake
(meta) kernel, so ``torch.compile`` traces them without graph breaks, and one
kernel per device registered with torch.library (the CPU kernel is the op's
body, the CUDA one ``register_kernel("cuda")``), so torch's dispatcher, not the
extension, picks the backend. The loss options travel as one list in the
library's order (``OPTION_NAMES``).

Fused linear (``fused_linear_kto_loss``, ops ``kto::fused_linear_forward`` and
``kto::fused_linear_logprobs``): the same loss from the hidden states and the
lm_head weight (and bias), the logits never materialised; autograd to hidden,
weight and bias. Gradients are computed in the forward, chunk by chunk, and
scaled by the incoming gradient in the backward (as Liger's fused losses do).

Logits: [rows, V] or [B, T, V], float32, float64, bfloat16 or float16 on the
CPU (the Eigen path); float32, bfloat16 or float16 on CUDA (kto's CUDA kernels,
when the extension was built with nvcc; the forward then synchronises once to
raise device-detected errors). Strides are read as they are: ``logits[:, :-1]``,
``labels[:, 1:]``, strided slices and ``expand``-ed tensors (stride 0: one row
repeated) need no copy; a layout the library cannot read in place (the
vocabulary dimension not contiguous, interleaved batch entries such as a
transposed [T, B, V]) is copied to a contiguous tensor first. Gradients are new
contiguous tensors. Targets: int64 (or int32) [rows] or [B, T] with
ignore_index. Sequences: CSR ``offsets`` over the rows (int64 or int32, B + 1
entries); for [B, T, V] logits ``offsets=None`` means padded sequences. Labels
(``desirable``): bool, or integers/floats equal to 0 or 1 (anything else raises,
naming the index and the value). Only the loss is differentiable; metrics are
detached, as in TRL.

Devices: the logits (hidden states) decide. Targets, the lm_head's weight and
bias and the KL batch's hidden states must be on the same device; the small
per-sequence tensors (offsets, reference_logp, desirable, the KL log-probs and
token counts, global_kl) may also be on the CPU. Anything else raises a
ValueError naming the function, the argument, the expectation and what came.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _C, _isa
from ._errors import KTOError, NonFiniteLogitsError, PeerError

__all__ = ["BF16_GEMM", "EXAMPLE_OUTPUT_NAMES", "KL_ESTIMATORS", "KTOError", "KTOOutput", "LINKS",
           "LOSS_TYPES", "METRIC_NAMES", "NonFiniteLogitsError", "OPTION_NAMES", "PeerError",
           "REDUCTIONS", "REFERENCE_POINTS",
           "STRATEGIES", "__version__", "build_info", "fused_linear_kto_loss",
           "fused_linear_logprobs", "kl_partial", "kto_loss", "reference_point",
           "release_scratch", "sequence_logprobs"]
__version__ = _C.version()  # the library's (KTO_VERSION_* in include/kto/config.hpp)

LOSS_TYPES = {"kto": 0, "apo_zero_unpaired": 1}
LINKS = {"one_minus_sigmoid": 0, "neg_log_sigmoid": 1}
REFERENCE_POINTS = {"kl_batch": 0, "fixed": 1, "zero": 2}
KL_ESTIMATORS = {"mean": 0, "nonempty_mean": 1}
REDUCTIONS = {"mean": 0, "sum": 1}
METRIC_NAMES = tuple(_C.metric_names())  # the library's names, in its array order
EXAMPLE_OUTPUT_NAMES = tuple(_C.example_output_names())  # rows of the per-example output
# The fused step's default chunk budget on each device (read once: torch.compile traces it).
_DEFAULT_CHUNK_BYTES = {False: _C.default_chunk_bytes(False), True: _C.default_chunk_bytes(True)}
# The options every op takes as one float list, in the library's order (kto/options.hpp).
OPTION_NAMES = tuple(_C.option_names())
# Whether this CPU runs the library's bf16 GEMM (AVX512-BF16): bfloat16 fused heads then
# multiply in bf16 with fp32 accumulation; otherwise they are widened to fp32.
BF16_GEMM = bool(_isa.CPU.bf16_gemm_supported())


def build_info() -> dict:
    """How this installation was built and what it runs: the x86-64 level the CPU ops
    were compiled for (``compiled_isa``) and the copy this CPU dispatched to
    (``dispatched_isa``, of ``built_isas``; kto_torch/_isa.py), the CPU's own level
    (``cpu_isa``), Eigen's version and SIMD sets, the CPU threads the ops use, and the
    CUDA runtime the CUDA ops were built against (None without them)."""
    info = dict(_C.build_info())
    info["dispatched_isa"] = _isa.CPU.compiled_isa()
    info["eigen_simd"] = _isa.CPU.build_info()["eigen_simd"]
    info["built_isas"] = list(_isa.BUILT)
    info["cpu_isa"] = _C.cpu_isa()
    info["threads"] = torch.get_num_threads()
    info["torch"] = torch.__version__
    return info


def release_scratch() -> None:
    """Frees the chunk buffers the CPU fused ops keep in the calling thread between calls
    (at most the chunk budget per role; kto::cpu::release_scratch)."""
    _isa.CPU.release_scratch()
_ENUMS = {"loss_type": LOSS_TYPES, "link": LINKS, "reference_point": REFERENCE_POINTS,
          "kl_estimator": KL_ESTIMATORS, "reduction": REDUCTIONS}
_DEFAULT_OPTIONS = dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto",
                        link="one_minus_sigmoid", reference_point="kl_batch",
                        kl_estimator="mean", clamp_kl=True, fixed_z0=0.0, average_logprob=False,
                        reduction="mean", mean_denominator=0, ignore_index=-100,
                        token_statistics=False, logit_scale=1.0, logit_softcap=0.0,
                        temperature=1.0)
assert set(_DEFAULT_OPTIONS) == set(OPTION_NAMES), "kto_torch and its extension disagree"


def _options(**given) -> list:
    """The ops' options list: the library's names in its order, enums as their codes (the
    C++ side checks every value and names it)."""
    merged = {**_DEFAULT_OPTIONS, **given}
    values = []
    for name in OPTION_NAMES:
        value = merged[name]
        if name in _ENUMS:
            value = _lookup(_ENUMS[name], name, value)
        values.append(float(value))
    return values


def _rows(logits: Tensor) -> int:
    return logits.shape[0] if logits.dim() == 2 else logits.shape[0] * logits.shape[1]


def _accumulation(logits: Tensor) -> torch.dtype:
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


def _per_device(op, name: str):
    """Registers the op's CUDA kernel (the CPU one is the custom op's own body): each calls
    the extension's entry point for its backend, chosen by torch's dispatcher."""
    cuda = getattr(_C, name + "_cuda")
    op.register_kernel("cuda")(lambda *args: _tuple(cuda(*args)))


def _tuple(out):
    return tuple(out) if isinstance(out, list) else out


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


def _token_statistics_like(like: Tensor, b: int, options: list) -> Tensor:
    """Each sequence's sums of its scored tokens' entropy (row 0) and mean logit (row 1),
    float64 on `like`'s device: [2, B], or [2, 0] when not requested."""
    requested = options[OPTION_NAMES.index("token_statistics")] != 0
    return torch.empty((2, b if requested else 0), dtype=torch.float64, device=like.device)


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


STRATEGIES = {"keep_chunk": 0, "recompute": 1, "vocab_blocks": 2}


@torch.library.custom_op("kto::fused_linear_forward", mutates_args=(), device_types="cpu")
def _fused_linear_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    offsets: Tensor,
    reference_logp: Tensor,
    desirable: Tensor,
    kl_hidden: Optional[Tensor],
    kl_targets: Optional[Tensor],
    kl_offsets: Optional[Tensor],
    kl_reference_logp: Optional[Tensor],
    options: list[float],
    chunk_bytes: int,
    strategy: int,
    weight_grad: bool = True,
    bias_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # weight_grad / bias_grad False (a frozen head, e.g. LoRA's lm_head): dW / db are not
    # computed and come back empty ([0, D] / [0]); dH and the loss are bit for bit the same.
    return tuple(_isa.CPU.fused_linear_forward_cpu(
        hidden, weight, bias, targets, offsets, reference_logp, desirable, kl_hidden, kl_targets,
        kl_offsets, kl_reference_logp, options, chunk_bytes, strategy, weight_grad, bias_grad))


@_fused_linear_forward.register_kernel("cuda")
def _(*args):
    # The dispatcher drops trailing arguments equal to their defaults (weight_grad,
    # bias_grad = True): the extension's entry point takes them all.
    return _tuple(_C.fused_linear_forward_cuda(*args, *(True, True)[len(args) - 14:]))


@_fused_linear_forward.register_fake
def _(hidden, weight, bias, targets, offsets, reference_logp, desirable, kl_hidden, kl_targets,
      kl_offsets, kl_reference_logp, *args):
    _check_devices("kto_torch.fused_linear_kto_loss", "hidden", hidden,
                   _given_pairs(weight=weight, bias=bias, targets=targets, kl_hidden=kl_hidden,
                                kl_targets=kl_targets),
                   _given_pairs(offsets=offsets, reference_logp=reference_logp,
                                desirable=desirable, kl_offsets=kl_offsets,
                                kl_reference_logp=kl_reference_logp))
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
    return tuple(_isa.CPU.fused_linear_logprobs_cpu(hidden, weight, bias, targets, offsets, options,
                                              chunk_bytes))


_per_device(_fused_linear_logprobs, "fused_linear_logprobs")


@_fused_linear_logprobs.register_fake
def _(hidden, weight, bias, targets, offsets, *args):
    _check_devices("kto_torch.fused_linear_logprobs", "hidden", hidden,
                   _given_pairs(weight=weight, bias=bias, targets=targets), [("offsets", offsets)])
    b = offsets.shape[0] - 1
    return (hidden.new_empty((b,), dtype=_accumulation(hidden)),
            hidden.new_empty((b,), dtype=torch.int64))


class KTOOutput(NamedTuple):
    loss: Tensor          # scalar, differentiable w.r.t. the logits
    metrics: dict         # TRL's names → detached 0-d tensors
    logp: Tensor          # per example, detached
    ratio: Tensor
    reward: Tensor
    example_loss: Tensor
    grad_logp: Tensor
    num_tokens: Tensor
    # With token_statistics=True, per example (float64, on the logits' device): the sums
    # over its scored tokens of each token's entropy and of its mean logit (from the pass
    # that computes the log-softmax); None otherwise. TRL's `entropy` and `logits/*`
    # metrics divide them by token counts.
    entropy_sum: Optional[Tensor] = None
    mean_logit_sum: Optional[Tensor] = None


def _padded_offsets(fn: str, logits: Tensor) -> Tensor:
    if logits.dim() != 3:
        raise ValueError(f"{fn}: argument 'offsets' must be given for logits that are not "
                         f"[B, T, V] (padded sequences); got None with logits of shape "
                         f"{tuple(logits.shape)}")
    b, t = logits.shape[0], logits.shape[1]
    return torch.arange(b + 1, dtype=torch.int64) * t


def _given(fn: str, name: str, t: Optional[Tensor], expectation: str) -> None:
    """An optional tensor passed explicitly must not be empty: inside the ops an empty
    tensor means "absent", which only None may say."""
    if t is not None and t.numel() == 0:
        raise ValueError(f"{fn}: argument '{name}' must {expectation} (or be None); got an "
                         f"empty tensor of shape {tuple(t.shape)}")


def _loss_options(*values) -> list:
    """The options list from a loss function's option arguments, given in the library's
    order (OPTION_NAMES)."""
    return _options(**dict(zip(OPTION_NAMES, values, strict=True)))


def _lookup(table: dict, name: str, value: str) -> int:
    if value not in table:
        raise ValueError(f"kto: argument '{name}' must be one of {sorted(table)}; got {value!r}")
    return table[value]


def sequence_logprobs(logits: Tensor, targets: Tensor, offsets: Optional[Tensor] = None, *,
                      average_logprob: bool = False, ignore_index: int = -100,
                      logit_scale: float = 1.0, logit_softcap: float = 0.0,
                      temperature: float = 1.0):
    """(logp [B], num_tokens [B]) — forward only; the logit transform as in kto_loss."""
    if offsets is None:
        offsets = _padded_offsets("kto_torch.sequence_logprobs", logits)
    logp, n, _ = torch.ops.kto.sequence_logprobs(
        logits, targets, offsets,
        _options(average_logprob=average_logprob, ignore_index=ignore_index,
                 logit_scale=logit_scale, logit_softcap=logit_softcap, temperature=temperature))
    return logp, n


def _flatten_hidden(name: str, hidden: Tensor):
    """[N, D] or [B, T, D] → ([N, D] with unit stride along D, padded offsets or None)."""
    if hidden.dim() not in (2, 3):
        raise ValueError(f"kto: argument '{name}' must be [N, D] or [B, T, D]; got {hidden.dim()} "
                         "dims")
    offsets = None
    if hidden.dim() == 3:
        b, t = hidden.shape[0], hidden.shape[1]
        offsets = torch.arange(b + 1, dtype=torch.int64) * t
        hidden = hidden.reshape(b * t, hidden.shape[2])
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    return hidden, offsets


def _chunk_bytes(hidden: Tensor, chunk_bytes: Optional[int]) -> int:
    """The chunk budget: the caller's, or the library's default for hidden's device
    (kto::kDefaultCpuChunkBytes, kDefaultCudaChunkBytes: each measured on its device)."""
    if chunk_bytes is None:
        return _DEFAULT_CHUNK_BYTES[hidden.is_cuda]
    return int(chunk_bytes)


def fused_linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor,
                          offsets: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
                          average_logprob: bool = False, ignore_index: int = -100,
                          chunk_bytes: Optional[int] = None, logit_scale: float = 1.0,
                          logit_softcap: float = 0.0, temperature: float = 1.0):
    """(logp [B], num_tokens [B]) from hidden states and the lm_head — forward only
    (the reference model's log-probs, without materialising its logits). Layouts as in
    fused_linear_kto_loss."""
    fn = "kto_torch.fused_linear_logprobs"
    if weight.dim() == 2:
        _given(fn, "bias", bias, f"have V = weight.size(0) = {weight.shape[0]} entries")
    hidden, padded = _flatten_hidden("hidden", hidden)
    offsets = offsets if offsets is not None else padded
    if offsets is None:
        raise ValueError("kto: argument 'offsets' is needed for [N, D] hidden states")
    return torch.ops.kto.fused_linear_logprobs(
        hidden, weight, bias, targets.reshape(-1),
        offsets,
        _options(average_logprob=average_logprob, ignore_index=ignore_index,
                 logit_scale=logit_scale, logit_softcap=logit_softcap, temperature=temperature),
        _chunk_bytes(hidden, chunk_bytes))


def _kto_output(metrics: Tensor, per_example: Tensor, n: Tensor,
                token_statistics: Optional[Tensor]) -> KTOOutput:
    detached = metrics.detach()
    requested = token_statistics is not None
    return KTOOutput(
        loss=metrics[0],
        metrics={name: detached[i] for i, name in enumerate(METRIC_NAMES)},
        **{field: per_example[EXAMPLE_OUTPUT_NAMES.index(name)].detach()
           for field, name in (("logp", "logp"), ("ratio", "ratio"), ("reward", "reward"),
                               ("example_loss", "loss"), ("grad_logp", "grad_logp"))},
        num_tokens=n,
        entropy_sum=token_statistics[0] if requested else None,
        mean_logit_sum=token_statistics[1] if requested else None,
    )


def kl_partial(kl_policy_logp: Tensor, kl_reference_logp: Tensor, kl_num_tokens: Tensor, *,
               kl_estimator: str = "mean") -> Tensor:
    """Local (S, C) of the KL batch, float64 [2]: all-reduce it (SUM), then pass it to
    kto_loss(global_kl=...) on every rank."""
    return _C.kl_partial(kl_policy_logp, kl_reference_logp, kl_num_tokens,
                         _lookup(KL_ESTIMATORS, "kl_estimator", kl_estimator))


def reference_point(global_kl: Tensor, *, clamp_kl: bool = True) -> float:
    """z0 of an all-reduced (S, C): S / C, clamped at 0 unless clamp_kl is False (0 if C = 0).
    Pass it as kto_loss(..., reference_point="fixed", fixed_z0=z0) where a loss computes its
    log-probs itself, e.g. fused_linear_kto_loss under data parallel."""
    return _C.reference_point(global_kl, bool(clamp_kl))


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
    """The KTO loss of the target batch with TRL's metrics (see docs/math.md).

    ``global_kl``: an all-reduced (S, C) from kl_partial (1-D, 2 elements), used instead of
    the local KL batch; any other size raises (None means absent). ``token_statistics``:
    also each example's sums of its scored tokens' entropy and mean logit (KTOOutput's
    entropy_sum and mean_logit_sum), from the same pass over the logits.
    ``logit_scale`` a, ``logit_softcap`` c (0: off) and ``temperature`` τ: the logits are
    taken as z' = c·tanh(a·z / c) / τ (a·z / τ uncapped) before the log-softmax, as models
    with a scaled or soft-capped head do; the gradient is to the raw z."""
    fn = "kto_torch.kto_loss"
    options = _loss_options(beta, desirable_weight, undesirable_weight, loss_type, link,
                            reference_point, kl_estimator, clamp_kl, fixed_z0, average_logprob,
                            reduction, mean_denominator, ignore_index, token_statistics,
                            logit_scale, logit_softcap, temperature)
    if offsets is None:
        offsets = _padded_offsets(fn, logits)
    if global_kl is not None and (global_kl.dim() != 1 or global_kl.numel() != 2):
        raise ValueError(f"{fn}: argument 'global_kl' must hold the all-reduced (S, C): 1-D with "
                         f"2 elements (or be None); got shape {tuple(global_kl.shape)}")
    metrics, per_example, n, _, statistics = torch.ops.kto.step_forward(
        logits, targets, offsets, reference_logp, desirable, kl_policy_logp, kl_reference_logp,
        kl_num_tokens, global_kl, options)
    return _kto_output(metrics, per_example, n, statistics if token_statistics else None)


def fused_linear_kto_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    offsets: Optional[Tensor],
    reference_logp: Tensor,
    desirable: Tensor,
    bias: Optional[Tensor] = None,
    kl_hidden: Optional[Tensor] = None,
    kl_targets: Optional[Tensor] = None,
    kl_offsets: Optional[Tensor] = None,
    kl_reference_logp: Optional[Tensor] = None,
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
    chunk_bytes: Optional[int] = None,
    strategy: str = "keep_chunk",
    token_statistics: bool = False,
    logit_scale: float = 1.0,
    logit_softcap: float = 0.0,
    temperature: float = 1.0,
) -> KTOOutput:
    """The KTO loss from hidden states ([N, D] or [B, T, D]) and the lm_head weight [V, D]
    (and bias [V]): logits = hidden @ weight.T + bias, never materialised. The KL batch
    (kl_hidden, kl_targets, kl_offsets, kl_reference_logp) is forward only. Extra memory:
    one chunk of logits of at most ``chunk_bytes`` plus the fp32 gradients; ``strategy``
    "keep_chunk" (3 GEMMs a row) or "recompute" (4, the logits recomputed for the backward),
    both summing dW over row chunks in an fp32 [V, D] array, or on CUDA "vocab_blocks" (4):
    the backward by blocks of vocabulary columns over all rows at once, each block of dW
    one GEMM's fp32 sum written once in the weight's dtype, so no fp32 [V, D] array (an
    fp32 weight under mixed precision gets the fp32 sums). Its extra memory is room for a
    copy of the hidden states [N, D] and an fp32 [N, D] array for their gradient.

    Layouts: hidden states, weight and KL hidden states are read with their strides when
    their rows are at least D elements apart with unit stride along D; any other layout (a
    transpose, or stride 0 from ``expand`` over more than one row, which the library's
    matrices cannot take) is copied to a contiguous tensor first, and the gradient still
    reaches the original tensor. ``bias`` must be None or 1-D with V = weight.size(0)
    entries of weight's dtype on hidden's device (a strided bias is made contiguous).
    Dtypes: weight and bias have hidden's dtype, or (mixed precision: bfloat16/float16
    hidden states under autocast over an fp32 lm_head) float32: the GEMMs then read a copy
    in hidden's dtype and the head's gradients are the fp32 sums, unrounded.
    Gradients are new contiguous tensors. ``token_statistics``: as in kto_loss, from the
    pass that computes each row's log-softmax. ``logit_scale``, ``logit_softcap``,
    ``temperature``: as in kto_loss, on logits = hidden @ weight.T + bias.
    A frozen head (weight, and bias, with requires_grad=False, as under LoRA; or grad mode
    off): no dW (db) is computed, on the CPU no fp32 [V, D] array either, and the op returns
    an empty [0, D] tensor in its place; dH and the loss are bit for bit the same."""
    fn = "kto_torch.fused_linear_kto_loss"
    options = _loss_options(beta, desirable_weight, undesirable_weight, loss_type, link,
                            reference_point, kl_estimator, clamp_kl, fixed_z0, average_logprob,
                            reduction, mean_denominator, ignore_index, token_statistics,
                            logit_scale, logit_softcap, temperature)
    if weight.dim() == 2:
        _given(fn, "bias", bias, f"have V = weight.size(0) = {weight.shape[0]} entries")
    hidden, padded = _flatten_hidden("hidden", hidden)
    offsets = offsets if offsets is not None else padded
    if offsets is None:
        raise ValueError("kto: argument 'offsets' is needed for [N, D] hidden states")
    if kl_hidden is not None:
        kl_hidden, kl_padded = _flatten_hidden("kl_hidden", kl_hidden)
        kl_offsets = kl_offsets if kl_offsets is not None else kl_padded
        if kl_offsets is None or kl_targets is None or kl_reference_logp is None:
            raise ValueError("kto: the KL batch needs kl_targets, kl_offsets (for [N, D]) and "
                             "kl_reference_logp with kl_hidden")
    code = _lookup(STRATEGIES, "strategy", strategy)
    if code == STRATEGIES["vocab_blocks"] and hidden.device.type != "cuda":
        raise ValueError(f"{fn}: argument 'strategy' must be 'keep_chunk' or 'recompute' on "
                         f"{hidden.device.type} ('vocab_blocks' runs on CUDA only); got "
                         "'vocab_blocks'")
    # A frozen head (LoRA's lm_head; weight and bias needing no gradient): no dW / db.
    grad = torch.is_grad_enabled()
    weight_grad = grad and weight.requires_grad
    bias_grad = grad and bias is not None and bias.requires_grad
    metrics, per_example, n, _, _, _, statistics = torch.ops.kto.fused_linear_forward(
        hidden,
        weight,
        bias,
        targets.reshape(-1),
        offsets,
        reference_logp,
        desirable,
        kl_hidden,
        kl_targets.reshape(-1) if kl_targets is not None else None,
        kl_offsets,
        kl_reference_logp,
        options,
        _chunk_bytes(hidden, chunk_bytes),
        code,
        weight_grad,
        bias_grad,
    )
    return _kto_output(metrics, per_example, n, statistics if token_statistics else None)
