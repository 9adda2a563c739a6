"""The ops: sequence log-probs, the KL partial and the KTO loss from logits, and the same
from hidden states and the lm_head (fused linear), as jax.custom_vjp functions over the
library's FFI targets; data parallel (``kl_axis_name``) and vocab parallel
(``vocab_axis_name``) inside jax.shard_map."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._library import KL_ESTIMATORS, METRIC_NAMES, PER_EXAMPLE_NAMES, _call, _chunk_bytes
from ._options import STRATEGIES, KTOOptions


def _i32(x):
    return jnp.asarray(x, jnp.int32)


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _empty(dtype=jnp.float32):
    return jnp.zeros((0,), dtype)


def _padded_offsets(batch: int, length: int):
    return jnp.arange(batch + 1, dtype=jnp.int32) * length


def _rows(x, targets, offsets, name, fn):
    """[B, T, X] → [B·T, X] with padded offsets when offsets is None; one target a row."""
    x = jnp.asarray(x)
    if x.ndim == 3:
        b, t = x.shape[:2]
        if offsets is None:
            offsets = _padded_offsets(b, t)
        x = x.reshape(b * t, x.shape[2])
    elif x.ndim != 2:
        _fail(fn, name, f"must be 2-D [rows, X] or 3-D [B, T, X]; got shape {x.shape}")
    if offsets is None:
        _fail(fn, "offsets", f"must be given for a 2-D '{name}' (None means padded [B, T, X] "
                             "sequences); got None")
    targets = _i32(targets).reshape(-1)
    if targets.shape[0] != x.shape[0]:
        _fail(fn, "targets", f"must hold one token id per row of '{name}' ({x.shape[0]}); got "
                             f"{targets.shape[0]}")
    return x, targets, _i32(offsets)


def _global_kl(global_kl, fn="kto"):
    if global_kl is None:
        return _empty()
    g = _f32(lax.stop_gradient(global_kl))
    if g.shape != (2,):
        raise ValueError(f"{fn}: argument 'global_kl' must hold the all-reduced (S, C): 1-D "
                         f"with 2 elements (or be None); got shape {list(g.shape)}")
    return g


def _varying(x) -> frozenset:
    """The shard_map axes x varies over (empty outside shard_map)."""
    try:
        return frozenset(jax.typeof(x).manual_axis_type.varying)
    except AttributeError:
        return frozenset()


def _union_varying(*xs) -> frozenset:
    return frozenset().union(*(_varying(x) for x in xs))


def _vary(x, axes):
    """x typed as varying over `axes` too. An FFI call's results carry no varying-axis
    type of their own; inside shard_map they vary over what their operands vary over."""
    missing = tuple(sorted(frozenset(axes) - _varying(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def _cotangent(grad, operand_axes, all_axes):
    """A per-device gradient (varying over all_axes) as the cotangent of an operand that
    varies over operand_axes only: summed over the axes the operand is replicated on."""
    grad = _vary(grad, all_axes)
    summed = tuple(sorted(frozenset(all_axes) - frozenset(operand_axes)))
    return lax.psum(grad, summed) if summed else grad


def _outputs(metrics, per_example, num_tokens, row_lse, statistics=None, axes=frozenset()):
    """The metrics dict; ``statistics`` ([2, B]) only when the options asked for them;
    ``row_lse`` only from the logits step (None from the fused one, whose lse stays in the
    library's workspace on CUDA)."""
    metrics, per_example, num_tokens = (_vary(x, axes) for x in (metrics, per_example,
                                                                 num_tokens))
    out = {name: metrics[i] for i, name in enumerate(METRIC_NAMES)}
    for k, name in enumerate(PER_EXAMPLE_NAMES):
        out[f"per_example/{name}"] = per_example[k]
    out["per_example/num_tokens"] = num_tokens
    if row_lse is not None:
        out["per_row/lse"] = _vary(row_lse, axes)  # 0 on unscored rows
    if statistics is not None:
        statistics = _vary(statistics, axes)
        out["per_example/entropy_sum"] = statistics[0]
        out["per_example/mean_logit_sum"] = statistics[1]
    return out


def _requested(options, statistics):
    return statistics if options.token_statistics else None


def _step_results(rows: int, b: int, options):
    """metrics, per-example rows, token counts, per-row lse, and the token statistics
    [2, B] (entropy and mean-logit sums; [2, 0] unless the options ask for them)."""
    return (
        jax.ShapeDtypeStruct((len(METRIC_NAMES),), jnp.float32),
        jax.ShapeDtypeStruct((len(PER_EXAMPLE_NAMES), b), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
        jax.ShapeDtypeStruct((rows,), jnp.float32),
        jax.ShapeDtypeStruct((2, b if options.token_statistics else 0), jnp.float32),
    )


# --------------------------------------------------------------------------- logits level


def sequence_logprobs(logits, targets, offsets=None, *, average_logprob=False, ignore_index=-100,
                      logit_scale=1.0, logit_softcap=0.0, temperature=1.0):
    """Per-sequence log-probs and token counts (forward only, no gradient), of the logits
    after the model's transform (KTOOptions says how)."""
    logits, targets, offsets = _rows(logits, targets, offsets, "logits",
                                     "kto_jax.sequence_logprobs")
    b = offsets.shape[0] - 1
    call = _call("kto_sequence_logprobs",
                 (jax.ShapeDtypeStruct((b,), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.int32)),
                 options=KTOOptions(average_logprob=average_logprob, ignore_index=ignore_index,
                                    logit_scale=logit_scale, logit_softcap=logit_softcap,
                                    temperature=temperature).values())
    return call(lax.stop_gradient(logits), targets, offsets)


def kl_partial(kl_policy_logp, kl_reference_logp, kl_num_tokens, *, kl_estimator="mean"):
    """This device's (S, C) of the KL batch, float32 [2]: lax.psum it over the data-parallel
    axis and pass it as ``global_kl`` (what ``kl_axis_name`` does)."""
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kto: argument 'kl_estimator' must be one of {sorted(KL_ESTIMATORS)}; "
                         f"got {kl_estimator!r}")
    call = _call("kto_kl_partial", jax.ShapeDtypeStruct((2,), jnp.float32),
                 kl_estimator=np.int32(KL_ESTIMATORS[kl_estimator]))
    return call(lax.stop_gradient(_f32(kl_policy_logp)), lax.stop_gradient(_f32(kl_reference_logp)),
                _i32(kl_num_tokens))


def _step_forward(options, logits, targets, offsets, reference_logp, desirable, kl_policy_logp,
                  kl_reference_logp, kl_num_tokens, global_kl):
    call = _call("kto_step_forward", _step_results(logits.shape[0], offsets.shape[0] - 1, options),
                 options=options.values())
    return call(logits, targets, offsets, reference_logp, desirable, kl_policy_logp,
                kl_reference_logp, kl_num_tokens, global_kl)


# static: (options, axes every operand varies over together, axes of the logits)
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kto_core(static, logits, targets, offsets, reference_logp, desirable, kl_policy_logp,
              kl_reference_logp, kl_num_tokens, global_kl):
    options, axes, _ = static
    metrics, per_example, n, row_lse, statistics = _step_forward(
        options, logits, targets, offsets, reference_logp, desirable, kl_policy_logp,
        kl_reference_logp, kl_num_tokens, global_kl)
    out = _outputs(metrics, per_example, n, row_lse, _requested(options, statistics), axes)
    return out["loss"], out


def _kto_core_fwd(static, logits, targets, offsets, *rest):
    options, axes, _ = static
    metrics, per_example, n, row_lse, statistics = _step_forward(options, logits, targets,
                                                                 offsets, *rest)
    residuals = (logits, targets, offsets, row_lse, per_example[4], n)
    out = _outputs(metrics, per_example, n, row_lse, _requested(options, statistics), axes)
    return (out["loss"], out), residuals


def _kto_core_bwd(static, residuals, cotangents):
    options, axes, logits_axes = static
    logits, targets, offsets, row_lse, grad_logp, n = residuals
    loss_cotangent = _f32(cotangents[0]).reshape(1)
    call = _call("kto_step_backward", jax.ShapeDtypeStruct(logits.shape, logits.dtype),
                 options=options.values())
    dlogits = call(logits, targets, offsets, row_lse, grad_logp, n, loss_cotangent)
    # Only the policy logits are differentiable; the rest get no cotangent.
    return (_cotangent(dlogits, logits_axes, axes),) + (None,) * 8


_kto_core.defvjp(_kto_core_fwd, _kto_core_bwd)


def kto_loss(logits, targets, offsets, reference_logp, desirable, kl_policy_logp=None,
             kl_reference_logp=None, kl_num_tokens=None, options=KTOOptions(), *,
             global_kl=None, kl_axis_name=None):
    """(loss, metrics): TRL's KTO loss of the target batch and its metrics.

    logits: [rows, V] with CSR ``offsets`` [B+1], or [B, T, V] (``offsets`` None: padded);
    float32, bfloat16 or float16. ``global_kl``: an all-reduced (S, C) replacing the local
    KL batch. ``kl_axis_name`` (inside shard_map): psum this device's (S, C) over that axis
    first. The gradient reaches ``logits`` only."""
    logits, targets, offsets = _rows(logits, targets, offsets, "logits", "kto_jax.kto_loss")
    kl_p = _f32(kl_policy_logp) if kl_policy_logp is not None else _empty()
    kl_r = _f32(kl_reference_logp) if kl_reference_logp is not None else _empty()
    kl_n = _i32(kl_num_tokens) if kl_num_tokens is not None else _empty(jnp.int32)
    if kl_axis_name is not None and global_kl is None and options.uses_kl_batch:
        local = kl_partial(kl_p, kl_r, kl_n, kl_estimator=options.kl_estimator)
        axes = _union_varying(kl_p, kl_r, kl_n) | {kl_axis_name}
        global_kl = lax.psum(_vary(local, axes), kl_axis_name)
    args = (logits, targets, offsets, lax.stop_gradient(_f32(reference_logp)),
            jnp.asarray(desirable, jnp.uint8), kl_p, kl_r, kl_n, _global_kl(global_kl))
    static = (options, _union_varying(*args), _varying(logits))
    return _kto_core(static, *args)


# --------------------------------------------------------------------------- fused linear


def _head(hidden, weight, bias):
    """hidden, weight and bias in one dtype (the promotion of theirs; an exact upcast)."""
    dtype = jnp.result_type(hidden.dtype, weight.dtype, *([] if bias is None else [bias.dtype]))
    b = _empty(dtype) if bias is None else jnp.asarray(bias, dtype)
    if b.ndim != 1:
        raise ValueError(f"kto: argument 'bias' must be None or 1-D [V]; got shape {b.shape}")
    return hidden.astype(dtype), jnp.asarray(weight, dtype), b


def _platform(x) -> str:
    """The platform an op on x runs on: x's device when it is a concrete array, else the
    default backend (under jit)."""
    try:
        return next(iter(x.devices())).platform
    except (AttributeError, StopIteration, TypeError, jax.errors.ConcretizationTypeError):
        return jax.default_backend()


def _row_partials(hidden, weight, bias, targets, offsets, vocab_begin, vocab_total, options,
                  chunk_bytes):
    """Each row's (lse over this vocabulary slice, target logit if the slice owns it) [N, 2]."""
    call = _call("kto_fused_linear_row_partials",
                 jax.ShapeDtypeStruct((hidden.shape[0], 2), jnp.float32),
                 options=options.values(), vocab_total=np.int64(vocab_total),
                 chunk_bytes=np.int64(chunk_bytes))
    return call(*map(lax.stop_gradient, (hidden, weight, bias)), targets, offsets, vocab_begin)


def _vocab_slice(weight, vocab_axis_name):
    """(vocab_begin [1] int32, vocab_total) of this device's contiguous slice of the
    vocabulary, in axis order."""
    vocab_total = weight.shape[0] * lax.axis_size(vocab_axis_name)
    vocab_begin = (lax.axis_index(vocab_axis_name) * weight.shape[0]).astype(jnp.int32)
    return vocab_begin.reshape(1), vocab_total


def _slice_partials(hidden, weight, bias, targets, offsets, options, chunk_bytes,
                    vocab_axis_name):
    """This device's row partials [N, 2] (typed as varying over the vocab axis), its
    vocab_begin and the vocab_total."""
    vocab_begin, vocab_total = _vocab_slice(weight, vocab_axis_name)
    partials = _row_partials(hidden, weight, bias, targets, offsets, vocab_begin, vocab_total,
                             options, chunk_bytes)
    axes = _union_varying(hidden, weight, bias, targets, offsets) | {vocab_axis_name}
    return _vary(partials, axes), vocab_begin, vocab_total


def fused_linear_logprobs(hidden, weight, targets, offsets=None, bias=None, *,
                          average_logprob=False, ignore_index=-100,
                          chunk_bytes=None, logit_scale=1.0, logit_softcap=0.0, temperature=1.0,
                          vocab_axis_name=None):
    """Per-sequence log-probs and token counts from hidden states and the lm_head
    (forward only: the reference model, the KL batch), of the logits after the model's
    transform (KTOOptions says how).

    ``vocab_axis_name`` (inside shard_map): ``weight`` (and ``bias``) is this device's
    contiguous slice of the vocabulary, in axis order; every slice's row partials (lse,
    target logit) are merged over the axis (pmax and psum), so every device returns the
    same log-probs."""
    hidden, targets, offsets = _rows(hidden, targets, offsets, "hidden",
                                     "kto_jax.fused_linear_logprobs")
    hidden, weight, bias = _head(hidden, weight, bias)
    chunk_bytes = _chunk_bytes(chunk_bytes)
    b = offsets.shape[0] - 1
    options = KTOOptions(average_logprob=average_logprob, ignore_index=ignore_index,
                         logit_scale=logit_scale, logit_softcap=logit_softcap,
                         temperature=temperature)
    if vocab_axis_name is not None:
        partials, _, _ = _slice_partials(hidden, weight, bias, targets, offsets, options,
                                         chunk_bytes, vocab_axis_name)
        return _merged_logprobs(partials, targets, offsets, options, vocab_axis_name)
    call = _call("kto_fused_linear_logprobs",
                 (jax.ShapeDtypeStruct((b,), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.int32)),
                 options=options.values(), chunk_bytes=np.int64(chunk_bytes))
    return call(*map(lax.stop_gradient, (hidden, weight, bias)), targets, offsets)


def _merged_logprobs(partials, targets, offsets, options, axis):
    """logp [B], num_tokens [B] of this slice's row partials merged over `axis` as
    kto::merge_row_partials merges them (lse by log-sum-exp, the target logit from the
    slice that owns it), by collectives whose results every slice shares."""
    top = lax.pmax(partials[:, 0], axis)
    lse = top + jnp.log(lax.psum(jnp.exp(partials[:, 0] - top), axis))
    token = lax.psum(partials[:, 1], axis) - lse
    rows = jnp.arange(targets.shape[0])
    b = offsets.shape[0] - 1
    # Row r belongs to the last sequence s with offsets[s] <= r (kto::sequence_of_row).
    sequence = jnp.searchsorted(offsets, rows, side="right") - 1
    scored = (targets != options.ignore_index) & (rows >= offsets[0]) & (rows < offsets[-1])
    sequence = jnp.where(scored, sequence, b)  # unscored rows: a sequence past the end
    logp = jax.ops.segment_sum(jnp.where(scored, token, 0.0), sequence, num_segments=b + 1)[:b]
    n = jax.ops.segment_sum(scored.astype(jnp.int32), sequence, num_segments=b + 1)[:b]
    if options.average_logprob:
        logp = jnp.where(n > 0, logp / jnp.maximum(n, 1), 0.0)
    return lax.stop_gradient(logp), n


def fused_linear_kl_partial(kl_hidden, weight, kl_targets, kl_offsets, kl_reference_logp,
                            bias=None, options=KTOOptions(), *, chunk_bytes=None,
                            vocab_axis_name=None):
    """This device's (S, C) of a KL batch given as hidden states, float32 [2]."""
    logp, n = fused_linear_logprobs(kl_hidden, weight, kl_targets, kl_offsets, bias,
                                    average_logprob=options.average_logprob,
                                    ignore_index=options.ignore_index, chunk_bytes=chunk_bytes,
                                    logit_scale=options.logit_scale,
                                    logit_softcap=options.logit_softcap,
                                    temperature=options.temperature,
                                    vocab_axis_name=vocab_axis_name)
    return kl_partial(logp, kl_reference_logp, n, kl_estimator=options.kl_estimator)


def _fused_step(static, hidden, weight, bias, targets, offsets, reference_logp, desirable,
                global_kl, gathered, vocab_begin):
    options, vocab_total, chunk_bytes, strategy = static[:4]
    n, d = hidden.shape
    v = weight.shape[0]
    b = offsets.shape[0] - 1
    # vocab_blocks writes each block of dW once, in the input dtype (CUDA).
    dw_dtype = hidden.dtype if strategy == "vocab_blocks" else jnp.float32
    results = _step_results(n, b, options) + (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((v, d), dw_dtype),
        jax.ShapeDtypeStruct(bias.shape, jnp.float32),
    )
    call = _call("kto_fused_linear_step", results, options=options.values(),
                 vocab_total=np.int64(vocab_total), chunk_bytes=np.int64(chunk_bytes),
                 strategy=np.int32(STRATEGIES[strategy]))
    return call(hidden, weight, bias, targets, offsets, reference_logp, desirable, global_kl,
                gathered, vocab_begin)


# static: (options, vocab_total, chunk_bytes, strategy, dtype, axes every operand varies over
# together, axes of the outputs (those less the vocab axis: every slice computes the same
# loss), axes of hidden, weight and bias)
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_core(static, *args):
    metrics, per_example, n, _, statistics, *_ = _fused_step(static, *args)
    out = _outputs(metrics, per_example, n, None, _requested(static[0], statistics), static[6])
    return out["loss"], out


def _fused_core_fwd(static, *args):
    metrics, per_example, n, _, statistics, dh, dw, db = _fused_step(static, *args)
    out = _outputs(metrics, per_example, n, None, _requested(static[0], statistics), static[6])
    return (out["loss"], out), (dh, dw, db)


def _fused_core_bwd(static, residuals, cotangents):
    dtype, axes, _, operand_axes = static[4:]
    ct = _f32(cotangents[0])
    # The library's gradients, scaled in fp32, summed over the axes an operand is
    # replicated on (dH over the vocab axis, dW and db over the data axis), then rounded
    # to the input dtype: once, except a vocab_blocks dW, which the library already wrote in
    # the input dtype (each rank's before the sum over the data axis).
    grads = tuple(_cotangent(ct * g, a, axes).astype(dtype)
                  for g, a in zip(residuals, operand_axes, strict=True))
    return grads + (None,) * 7


_fused_core.defvjp(_fused_core_fwd, _fused_core_bwd)


def _fail(fn, name, message, error=ValueError):
    raise error(f"{fn}: argument '{name}' {message}")


def _kl_logprobs(fn, options, kl_policy_logp, kl_reference_logp, kl_num_tokens, global_kl):
    """The KL batch's log-probs as float32/int32 vectors (empty where absent), checked as
    kto_torch checks them: one entry per KL sequence each, and a KL batch (or global_kl)
    whenever the options estimate z0 from one."""
    given = {name: x for name, x in (("kl_policy_logp", kl_policy_logp),
                                     ("kl_reference_logp", kl_reference_logp),
                                     ("kl_num_tokens", kl_num_tokens)) if x is not None}
    for name, x in given.items():
        if jnp.ndim(x) != 1:
            _fail(fn, name, f"must be 1-D (one entry per KL sequence); got shape "
                            f"{list(jnp.shape(x))}")
    if kl_policy_logp is None and given:
        _fail(fn, "kl_policy_logp", f"must be given with {' and '.join(given)} (the KL batch's "
                                    "policy log-probs); got None")
    k = jnp.shape(kl_policy_logp)[0] if kl_policy_logp is not None else 0
    if kl_policy_logp is not None and kl_reference_logp is None:
        _fail(fn, "kl_reference_logp", f"must be given with kl_policy_logp ({k} entries, one "
                                       "per KL sequence); got None")
    if kl_reference_logp is not None and jnp.shape(kl_reference_logp)[0] != k:
        _fail(fn, "kl_reference_logp", f"must have {k} entries (one per KL sequence, as "
                                       f"kl_policy_logp); got {jnp.shape(kl_reference_logp)[0]}")
    if kl_num_tokens is not None and jnp.shape(kl_num_tokens)[0] != k:
        _fail(fn, "kl_num_tokens", f"must have {k} entries (one per KL sequence, as "
                                   f"kl_policy_logp); got {jnp.shape(kl_num_tokens)[0]}")
    if options.uses_kl_batch and global_kl is None:
        if k == 0:
            _fail(fn, "kl_policy_logp", "must hold the KL batch's log-probs (at least one "
                                        "sequence) with reference_point='kl_batch' (the "
                                        "default): pass kl_policy_logp and kl_reference_logp "
                                        "(and kl_num_tokens), or global_kl, or choose "
                                        "reference_point='zero' or 'fixed'; got none")
        if options.kl_estimator == "nonempty_mean" and kl_num_tokens is None:
            _fail(fn, "kl_num_tokens", f"must have {k} entries (one per KL sequence) with "
                                       "kl_estimator='nonempty_mean'; got None")
    return (_f32(kl_policy_logp) if kl_policy_logp is not None else _empty(),
            _f32(kl_reference_logp) if kl_reference_logp is not None else _empty(),
            _i32(kl_num_tokens) if kl_num_tokens is not None else _empty(jnp.int32))


def fused_linear_kto_loss(hidden, weight, targets, offsets, reference_logp, desirable, bias=None,
                          *, options=KTOOptions(), kl_policy_logp=None, kl_reference_logp=None,
                          kl_num_tokens=None, global_kl=None, kl_axis_name=None,
                          vocab_axis_name=None, chunk_bytes=None, strategy="keep_chunk"):
    """(loss, metrics) from hidden states and the lm_head: logits = hidden @ weight.T + bias,
    never materialised (one chunk of at most ``chunk_bytes`` of logits at a time; the
    GEMMs multiply the scored rows only).

    hidden: [N, D] with CSR ``offsets`` [B+1], or [B, T, D] (``offsets`` None: padded);
    weight [V, D]; bias [V] or None; float32, bfloat16 or float16 (mixed dtypes are promoted,
    an exact upcast). The gradient reaches hidden, weight and bias.

    The KL batch, keyword only, as kto_torch.fused_linear_kto_loss takes it:
    ``kl_policy_logp``, ``kl_reference_logp`` (and ``kl_num_tokens``), its per-sequence
    log-probs (``fused_linear_logprobs`` of its hidden states, under stop_gradient: it
    never receives a gradient); or ``global_kl``, an all-reduced (S, C).

    ``strategy``: "keep_chunk" (3 GEMMs a row) or "recompute" (4), both summing dW over
    row chunks in an fp32 [V, D] array; on CUDA also "vocab_blocks": the backward by
    blocks of vocabulary columns over all rows, each block of dW written once in the input
    dtype (no fp32 [V, D] array).

    Inside jax.shard_map: ``kl_axis_name`` psums the KL batch's (S, C) over that axis
    (data parallel); ``vocab_axis_name`` takes ``weight`` (and ``bias``) as this device's
    contiguous slice of the vocabulary, in axis order, all-gathers every row's (lse,
    target logit) partials and lets the library merge them: loss and metrics are then the
    same on every device, dW and db are this device's slice and dH this device's partial
    sum (shard_map's transpose sums it over the axis for a replicated ``hidden``). Both
    together: the KL log-probs from ``fused_linear_logprobs(..., vocab_axis_name=)``."""
    fn = "kto_jax.fused_linear_kto_loss"
    if vocab_axis_name is not None and options.token_statistics:
        raise NotImplementedError(f"{fn}: argument 'options.token_statistics' must be False "
                                  "with vocab_axis_name (the statistics need every slice's "
                                  "logits of a row); got True")
    if strategy not in STRATEGIES:
        _fail(fn, "strategy", f"must be one of {sorted(STRATEGIES)}; got {strategy!r}")
    hidden, targets, offsets = _rows(hidden, targets, offsets, "hidden", fn)
    if strategy == "vocab_blocks" and vocab_axis_name is not None:
        _fail(fn, "strategy", "must be 'keep_chunk' or 'recompute' with vocab_axis_name (a "
                              "vocabulary slice's backward runs as recompute's); got "
                              "'vocab_blocks'")
    if strategy == "vocab_blocks" and _platform(hidden) == "cpu":
        _fail(fn, "strategy", "must be 'keep_chunk' or 'recompute' on cpu ('vocab_blocks' "
                              "runs on CUDA only); got 'vocab_blocks'")
    hidden, weight, bias = _head(hidden, weight, bias)
    chunk_bytes = _chunk_bytes(chunk_bytes)
    kl_p, kl_r, kl_n = _kl_logprobs(fn, options, kl_policy_logp, kl_reference_logp,
                                    kl_num_tokens, global_kl)
    if global_kl is None and options.uses_kl_batch:
        # z0 from the KL batch's (S, C), summed over kl_axis_name first (data parallel).
        global_kl = kl_partial(kl_p, kl_r, kl_n, kl_estimator=options.kl_estimator)
        if kl_axis_name is not None:
            axes = _union_varying(kl_p, kl_r, kl_n) | {kl_axis_name}
            global_kl = lax.psum(_vary(global_kl, axes), kl_axis_name)
    vocab_total, gathered = 0, _empty()
    vocab_begin = jnp.zeros((1,), jnp.int32)
    if vocab_axis_name is not None:
        partials, vocab_begin, vocab_total = _slice_partials(
            hidden, weight, bias, targets, offsets, options, chunk_bytes, vocab_axis_name)
        # [slices, N, 2], in axis order: slice k holds vocabulary rows from k·V_local.
        gathered = lax.all_gather(partials, vocab_axis_name)
    args = (hidden, weight, bias, targets, offsets, lax.stop_gradient(_f32(reference_logp)),
            jnp.asarray(desirable, jnp.uint8), _global_kl(global_kl, fn), gathered, vocab_begin)
    axes = _union_varying(*args)
    static = (options, int(vocab_total), int(chunk_bytes), strategy, jnp.dtype(hidden.dtype).name,
              axes, axes - {vocab_axis_name}, tuple(_varying(x) for x in args[:3]))
    return _fused_core(static, *args)
