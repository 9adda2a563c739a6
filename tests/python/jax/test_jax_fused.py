"""kto_jax.fused_linear_kto_loss (hidden states + lm_head, CPU) against a float64 JAX
reference that materialises Z = H Wᵀ + b and applies the KTO loss of docs/math.md.

Tolerance rule (docs/math.md §7, tests/cpp/fused_problem.hpp): the logits-level rule of test_jax.py
(1e-5 relative to the condition scale of the log-probs) carried through one product: an
element of dH is bounded by 1e-4 · max|∂L/∂Z| · Σ_v |W[v, :]|, of dW by
1e-4 · max|∂L/∂Z| · Σ_r |H[r, :]|, of db by 1e-4 · max|∂L/∂Z| · rows; a gradient returned
in bfloat16/float16 adds that type's unit roundoff relative to the value. bf16 inputs are
upcast exactly, so the reference takes the upcast values.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kto_jax
from test_jax import (
    TRANSFORMS,
    assert_statistic,
    reference_logp,
    reference_loss,
    reference_token_statistics,
    transformed,
)

jax.config.update("jax_enable_x64", True)

RTOL = 1e-5


def make_fused_batch(seed, dim=7, vocab=19, dtype=jnp.float32, bias=True, num_sequences=5,
                     kl_sequences=4):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 6, size=num_sequences)
    lengths[1] = 1
    offsets = np.concatenate([[1], 1 + np.cumsum(lengths)]).astype(np.int32)  # row 0 outside
    rows = int(offsets[-1]) + 2
    targets = rng.integers(0, vocab, size=rows).astype(np.int32)
    targets[rng.random(rows) < 0.2] = -100
    if num_sequences > 2:
        targets[offsets[2] : offsets[3]] = -100  # an all-ignored sequence
    seq_of_row = np.full(rows, num_sequences)
    for s in range(num_sequences):
        seq_of_row[offsets[s] : offsets[s + 1]] = s
    kl_t = 3
    kl_rows = kl_sequences * kl_t
    kl_targets = rng.integers(0, vocab, size=kl_rows).astype(np.int32)
    kl_targets[::kl_t] = -100  # the prompt row of each KL sequence
    kl_offsets = (np.arange(kl_sequences + 1) * kl_t).astype(np.int32)
    kl_seq_of_row = np.repeat(np.arange(kl_sequences), kl_t)
    return dict(
        hidden=jnp.asarray(rng.normal(0, 1, size=(rows, dim)), dtype),
        weight=jnp.asarray(rng.normal(0, 0.5, size=(vocab, dim)), dtype),
        bias=jnp.asarray(rng.normal(0, 0.3, size=(vocab,)), dtype) if bias else None,
        targets=targets,
        offsets=offsets,
        seq_of_row=seq_of_row,
        desirable=(rng.random(num_sequences) < 0.5).astype(np.uint8),
        kl_hidden=jnp.asarray(rng.normal(0, 1, size=(kl_rows, dim)), dtype),
        kl_targets=kl_targets,
        kl_offsets=kl_offsets,
        kl_seq_of_row=kl_seq_of_row,
        rng=rng,
    )


def logits64(batch, hidden, weight, bias):
    z = jnp.asarray(hidden, jnp.float64) @ jnp.asarray(weight, jnp.float64).T
    return z if bias is None else z + jnp.asarray(bias, jnp.float64)


def reference(batch, options):
    """(ref_logp, kl_reference_logp, loss, aux, grads, dZ) in float64."""
    rng = batch["rng"]
    h, w, b = batch["hidden"], batch["weight"], batch["bias"]
    kl_batch = dict(targets=batch["kl_targets"], offsets=batch["kl_offsets"],
                    seq_of_row=batch["kl_seq_of_row"])
    kl_logp, kl_n = reference_logp(logits64(batch, batch["kl_hidden"], w, b), kl_batch, options)
    kl_ref = np.asarray(kl_logp + rng.normal(0, 0.5, size=kl_logp.shape), np.float32)
    logp, _ = reference_logp(logits64(batch, h, w, b), batch, options)
    ref = np.asarray(logp + rng.normal(0, 0.5, size=logp.shape), np.float32)
    full = dict(batch, kl_policy_logp=np.asarray(kl_logp), kl_reference_logp=kl_ref,
                kl_num_tokens=np.asarray(kl_n).astype(np.int64))

    def loss_of(h64, w64, b64):
        z = h64 @ w64.T + (0.0 if b64 is None else b64)
        return reference_loss(z, full, ref, options)

    args = [jnp.asarray(x, jnp.float64) for x in (h, w)] + [
        None if b is None else jnp.asarray(b, jnp.float64)]
    loss, aux = loss_of(*args)
    argnums = (0, 1) if b is None else (0, 1, 2)
    grads = jax.grad(lambda *a: loss_of(*a)[0], argnums=argnums)(*args)
    dz = jax.grad(lambda z: reference_loss(z, full, ref, options)[0])(logits64(batch, h, w, b))
    return ref, kl_ref, loss, aux, grads, dz


def kl_logprobs(batch, options):
    """The KL batch's log-probs as a user computes them: fused_linear_logprobs of its hidden
    states with the options' log-prob settings (forward only)."""
    return kto_jax.fused_linear_logprobs(
        batch["kl_hidden"], batch["weight"], batch["kl_targets"], batch["kl_offsets"],
        batch["bias"],
        average_logprob=options.average_logprob, ignore_index=options.ignore_index,
        logit_scale=options.logit_scale, logit_softcap=options.logit_softcap,
        temperature=options.temperature)


def run(batch, ref, kl_ref, options, jit=True, **kwargs):
    kl_logp, kl_n = kl_logprobs(batch, options)

    def f(h, w, b):
        return kto_jax.fused_linear_kto_loss(
            h, w, batch["targets"], batch["offsets"], ref, batch["desirable"], b,
            options=options, kl_policy_logp=kl_logp, kl_reference_logp=kl_ref,
            kl_num_tokens=kl_n, **kwargs)

    args = (batch["hidden"], batch["weight"], batch["bias"])
    grad = jax.value_and_grad(f, argnums=(0, 1, 2) if args[2] is not None else (0, 1),
                              has_aux=True)
    (loss, metrics), grads = (jax.jit(grad) if jit else grad)(*args)
    return loss, metrics, grads


def check(batch, options, unit_roundoff=0.0, **kwargs):
    ref, kl_ref, want_loss, (z0, rho, logp, losses), want, dz = reference(batch, options)
    loss, metrics, grads = run(batch, ref, kl_ref, options, **kwargs)
    z = transformed(logits64(batch, batch["hidden"], batch["weight"], batch["bias"]), options)
    scale = 1.0 + float(jnp.abs(z).max()) * batch["hidden"].shape[0]
    assert abs(float(loss) - float(want_loss)) <= RTOL * scale * options.beta
    assert abs(float(metrics["kl"]) - z0) <= RTOL * scale
    np.testing.assert_allclose(metrics["per_example/logp"], logp, rtol=0, atol=RTOL * scale)
    np.testing.assert_allclose(metrics["per_example/ratio"], rho, rtol=0, atol=RTOL * scale)
    np.testing.assert_allclose(metrics["per_example/loss"], losses, rtol=0,
                               atol=RTOL * scale * options.beta * 2)
    # The fused op reports no per-row lse (on CUDA it never leaves the library's workspace).
    assert "per_row/lse" not in metrics
    # Unscored rows (outside every sequence, or ignored): gradient exactly 0, below.
    unscored = (batch["seq_of_row"] == len(batch["desirable"])) | (batch["targets"] == -100)
    gmax = float(jnp.abs(dz).max()) + 1e-30
    h, w = (np.abs(np.asarray(x, np.float64)) for x in (batch["hidden"], batch["weight"]))
    bounds = [10 * RTOL * gmax * w.sum(axis=0)[None, :], 10 * RTOL * gmax * h.sum(axis=0)[None, :],
              10 * RTOL * gmax * h.shape[0]]
    # Without a bias there is no db: zip stops at dW.
    for name, g, wg, bound in zip(("dH", "dW", "db"), grads, want, bounds, strict=False):
        assert g.dtype == batch["hidden"].dtype, name
        g, wg = np.asarray(g, np.float64), np.asarray(wg)
        err = np.abs(g - wg)
        assert np.all(err <= bound + unit_roundoff * np.abs(wg)), (name, err.max())
    assert np.all(np.asarray(grads[0])[unscored] == 0)
    return loss, metrics, grads


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strategy", ["keep_chunk", "recompute"])
def test_float32_matches_reference(bias, strategy):
    check(make_fused_batch(1, bias=bias), kto_jax.KTOOptions(beta=0.4, undesirable_weight=1.33),
          strategy=strategy)


def test_small_chunks_split_sequences_and_match_reference():
    # 3 rows of logits + hidden per chunk: sequences are split and walked twice.
    batch = make_fused_batch(2, dim=5, vocab=11)
    check(batch, kto_jax.KTOOptions(beta=0.3), chunk_bytes=3 * 4 * (11 + 5))


@pytest.mark.parametrize("dtype,unit_roundoff", [(jnp.bfloat16, 2.0**-8), (jnp.float16, 2.0**-11)])
def test_half_precision_inputs_match_reference_of_upcast_values(dtype, unit_roundoff):
    check(make_fused_batch(3, dim=16, vocab=301, dtype=dtype), kto_jax.KTOOptions(beta=0.5),
          unit_roundoff)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("link", ["one_minus_sigmoid", "neg_log_sigmoid"])
@pytest.mark.parametrize("kl_estimator", ["mean", "nonempty_mean"])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_option_matches_reference(loss_type, link, kl_estimator, average, reduction):
    options = kto_jax.KTOOptions(beta=0.7, desirable_weight=1.4, undesirable_weight=0.8,
                                 loss_type=loss_type, link=link, kl_estimator=kl_estimator,
                                 average_logprob=average, reduction=reduction)
    check(make_fused_batch(11), options)


def test_mean_denominator_scales_loss_and_gradients():
    batch = make_fused_batch(4)
    ref, kl_ref, *_ = reference(batch, kto_jax.KTOOptions())
    base = run(batch, ref, kl_ref, kto_jax.KTOOptions(beta=0.2))
    b = len(batch["desirable"])
    scaled = run(batch, ref, kl_ref, kto_jax.KTOOptions(beta=0.2, mean_denominator=4 * b))
    np.testing.assert_allclose(float(scaled[0]) * 4, float(base[0]), rtol=1e-6)
    for g, g0 in zip(scaled[2], base[2], strict=True):
        np.testing.assert_allclose(np.asarray(g) * 4, np.asarray(g0), rtol=1e-5, atol=1e-9)


def test_hidden_bt_d_mixed_dtypes_and_the_logits_op_agree():
    # [B, T, D] bf16 hidden states with an fp32 lm_head: promoted to fp32 (exact); the same
    # loss as the logits-level op on the materialised fp32 logits.
    rng = np.random.default_rng(5)
    B, T, D, V = 3, 4, 8, 13
    hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.bfloat16)
    weight = jnp.asarray(rng.normal(size=(V, D)) * 0.4, jnp.float32)
    labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
    labels[:, 0] = -100
    ref = np.full(B, -8.0, np.float32)
    des = np.array([1, 0, 1], np.uint8)
    opts = kto_jax.KTOOptions(beta=0.3, reference_point="fixed", fixed_z0=0.1)

    def fused(h, w):
        return kto_jax.fused_linear_kto_loss(h, w, labels, None, ref, des, options=opts)[0]

    def logits(h, w):
        z = h.astype(jnp.float32) @ w.T
        return kto_jax.kto_loss(z, labels, None, ref, des, options=opts)[0]

    (l1, g1), (l2, g2) = (jax.value_and_grad(f, argnums=(0, 1))(hidden, weight)
                          for f in (fused, logits))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    assert g1[0].dtype == jnp.bfloat16 and g1[0].shape == hidden.shape
    assert g1[1].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g1[1]), np.asarray(g2[1]), rtol=0,
                               atol=1e-5 * float(jnp.abs(g2[1]).max()))
    np.testing.assert_allclose(np.asarray(g1[0], np.float32), np.asarray(g2[0], np.float32),
                               rtol=2.0**-7, atol=1e-5 * float(jnp.abs(g2[0]).max()))


def test_cotangent_scales_the_gradients():
    batch = make_fused_batch(6)
    ref, kl_ref, *_ = reference(batch, kto_jax.KTOOptions())
    opts = kto_jax.KTOOptions()
    kl_logp, _ = kl_logprobs(batch, opts)

    def f(h, scale):
        loss, _ = kto_jax.fused_linear_kto_loss(
            h, batch["weight"], batch["targets"], batch["offsets"], ref, batch["desirable"],
            batch["bias"], options=opts, kl_policy_logp=kl_logp, kl_reference_logp=kl_ref)
        return scale * loss

    g1 = jax.grad(f)(batch["hidden"], 1.0)
    g3 = jax.grad(f)(batch["hidden"], -3.0)
    np.testing.assert_allclose(np.asarray(g3), -3.0 * np.asarray(g1), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=["scale", "softcap", "temperature", "all"])
@pytest.mark.parametrize("strategy", ["keep_chunk", "recompute"])
@pytest.mark.parametrize("dtype,unit_roundoff", [(jnp.float32, 0.0), (jnp.bfloat16, 2.0**-8)])
def test_logit_transform_matches_reference(transform, strategy, dtype, unit_roundoff):
    a, c, tau = transform
    options = kto_jax.KTOOptions(beta=0.4, logit_scale=a, logit_softcap=c, temperature=tau)
    check(make_fused_batch(21, dim=9, vocab=37, dtype=dtype), options, unit_roundoff,
          strategy=strategy, chunk_bytes=4 * 37 * 3)  # three rows a chunk: sequences split


def test_fused_logprobs_with_a_transform_match_reference():
    batch = make_fused_batch(8)
    options = kto_jax.KTOOptions(logit_scale=1.3, logit_softcap=1.5, temperature=0.8)
    logp, n = kto_jax.fused_linear_logprobs(batch["hidden"], batch["weight"], batch["targets"],
                                            batch["offsets"], batch["bias"], logit_scale=1.3,
                                            logit_softcap=1.5, temperature=0.8)
    want, want_n = reference_logp(
        logits64(batch, batch["hidden"], batch["weight"], batch["bias"]), batch, options)
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(n, want_n)


def test_fused_logprobs_match_reference():
    batch = make_fused_batch(7)
    logp, n = kto_jax.fused_linear_logprobs(batch["hidden"], batch["weight"], batch["targets"],
                                            batch["offsets"], batch["bias"])
    want, want_n = reference_logp(
        logits64(batch, batch["hidden"], batch["weight"], batch["bias"]), batch,
        kto_jax.KTOOptions())
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(n, want_n)


def test_nan_on_an_unscored_row_reaches_nothing():
    batch = make_fused_batch(8)
    ref, kl_ref, want_loss, *_ = reference(batch, kto_jax.KTOOptions())
    batch["hidden"] = batch["hidden"].at[0].set(jnp.nan)  # row 0 is outside every sequence
    loss, _, grads = run(batch, ref, kl_ref, kto_jax.KTOOptions())
    assert np.isfinite(float(loss)) and all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_bad_target_id_raises_the_library_message():
    batch = make_fused_batch(9)
    batch["targets"][batch["offsets"][0]] = 10_000
    with pytest.raises(Exception, match=r"kto::cpu::fused_linear_kto_step: argument 'targets"):
        run(batch, np.zeros(5, np.float32), np.zeros(4, np.float32), kto_jax.KTOOptions())


def test_bad_strategy_raises_before_calling_the_library():
    batch = make_fused_batch(10)
    with pytest.raises(ValueError, match=r"kto_jax.fused_linear_kto_loss: argument 'strategy' "
                                         r"must be one of \['keep_chunk', 'recompute', "
                                         r"'vocab_blocks'\]; got 'fast'"):
        run(batch, np.zeros(5, np.float32), np.zeros(4, np.float32), kto_jax.KTOOptions(),
            strategy="fast")


@pytest.mark.parametrize("jit", [False, True])
def test_vocab_blocks_is_refused_on_the_cpu(jit):
    batch = make_fused_batch(10)
    with pytest.raises(ValueError, match=r"kto_jax.fused_linear_kto_loss: argument 'strategy' "
                                         r"must be 'keep_chunk' or 'recompute' on cpu "
                                         r"\('vocab_blocks' runs on CUDA only\); got "
                                         r"'vocab_blocks'"):
        run(batch, np.zeros(5, np.float32), np.zeros(4, np.float32), kto_jax.KTOOptions(),
            jit=jit, strategy="vocab_blocks")


def test_the_cpu_handler_refuses_vocab_blocks_too():
    """A direct call of the FFI target (past the Python check) gets the same refusal."""
    from kto_jax.functional import _fused_step, _head
    batch = make_fused_batch(10)
    h, w, b = _head(batch["hidden"], batch["weight"], batch["bias"])
    static = (kto_jax.KTOOptions(), 0, 1 << 20, "vocab_blocks")
    with pytest.raises(Exception, match=r"argument 'strategy' must be 'keep_chunk' or "
                                        r"'recompute' on cpu"):
        jax.block_until_ready(_fused_step(
            static, h, w, b, jnp.asarray(batch["targets"]), jnp.asarray(batch["offsets"]),
            jnp.zeros(5, jnp.float32), jnp.asarray(batch["desirable"]),
            jnp.asarray([0.0, 1.0], jnp.float32), jnp.zeros((0,), jnp.float32),
            jnp.zeros((1,), jnp.int32)))


def _call_with_kl(batch, options=None, **kl):
    return kto_jax.fused_linear_kto_loss(
        batch["hidden"], batch["weight"], batch["targets"], batch["offsets"],
        np.zeros(5, np.float32), batch["desirable"], batch["bias"],
        options=options or kto_jax.KTOOptions(), **kl)


@pytest.mark.parametrize("kl,match", [
    (dict(), r"argument 'kl_policy_logp' must hold the KL batch's log-probs \(at least one "
             r"sequence\) with reference_point='kl_batch' \(the default\).*; got none"),
    (dict(kl_reference_logp=np.zeros(4, np.float32)),
     r"argument 'kl_policy_logp' must be given with kl_reference_logp .*; got None"),
    (dict(kl_policy_logp=np.zeros(4, np.float32)),
     r"argument 'kl_reference_logp' must be given with kl_policy_logp \(4 entries.*; got None"),
    (dict(kl_policy_logp=np.zeros(4, np.float32), kl_reference_logp=np.zeros(3, np.float32)),
     r"argument 'kl_reference_logp' must have 4 entries .*; got 3"),
    (dict(kl_policy_logp=np.zeros(4, np.float32), kl_reference_logp=np.zeros(4, np.float32),
          kl_num_tokens=np.ones(2, np.int32)),
     r"argument 'kl_num_tokens' must have 4 entries .*; got 2"),
    (dict(kl_policy_logp=np.zeros((4, 1), np.float32), kl_reference_logp=np.zeros(4, np.float32)),
     r"argument 'kl_policy_logp' must be 1-D .*; got shape \[4, 1\]"),
    (dict(global_kl=np.zeros(3, np.float32)),
     r"argument 'global_kl' must hold the all-reduced \(S, C\): 1-D with 2 elements .*; got "
     r"shape \[3\]"),
])
def test_bad_kl_batch_is_refused_by_name(kl, match):
    with pytest.raises(ValueError, match="kto_jax.fused_linear_kto_loss: " + match):
        _call_with_kl(make_fused_batch(12), **kl)


def test_nonempty_mean_needs_the_kl_token_counts():
    options = kto_jax.KTOOptions(kl_estimator="nonempty_mean")
    with pytest.raises(ValueError, match=r"kto_jax.fused_linear_kto_loss: argument "
                                         r"'kl_num_tokens' must have 4 entries \(one per KL "
                                         r"sequence\) with kl_estimator='nonempty_mean'; got None"):
        _call_with_kl(make_fused_batch(12), options, kl_policy_logp=np.zeros(4, np.float32),
                      kl_reference_logp=np.zeros(4, np.float32))


def test_no_kl_batch_is_needed_without_a_kl_reference_point():
    loss, _ = _call_with_kl(make_fused_batch(12), kto_jax.KTOOptions(reference_point="zero"))
    assert np.isfinite(float(loss))


def test_global_kl_equals_the_kl_batch_it_sums():
    batch = make_fused_batch(13)
    options = kto_jax.KTOOptions(beta=0.6)
    kl_logp, kl_n = kl_logprobs(batch, options)
    kl_ref = np.asarray(kl_logp) - 1.0 + 0.1 * np.arange(4)  # z0 > 0: the clamp hides nothing
    local = _call_with_kl(batch, options, kl_policy_logp=kl_logp, kl_reference_logp=kl_ref,
                          kl_num_tokens=kl_n)
    # (S, C) of the KL batch, computed here in float64 (the mean estimator: C = K).
    rho = np.asarray(kl_logp, np.float64) - np.asarray(kl_ref, np.float64)
    s_c = np.array([rho.sum(), len(rho)])
    given = _call_with_kl(batch, options, global_kl=s_c)
    assert float(local[1]["kl"]) > 0
    # The same z0 either way (the float32 KL log-probs summed in float32 or float64): within
    # a few float32 roundings of the log-probs' magnitude.
    scale = np.abs(np.asarray(kl_logp)).max()
    assert abs(float(local[1]["kl"]) - rho.mean()) <= 1e-5 * scale
    assert abs(float(given[1]["kl"]) - rho.mean()) <= 1e-5 * scale
    assert abs(float(local[0]) - float(given[0])) <= 1e-5


def test_compact_scoring_equals_the_full_batch():
    """Only the scored rows carry a loss: the batch with its prompt, padding and outside
    rows removed (the compact plan: scored rows, offsets over them) gives the same loss,
    metrics and dW, db, and the scored rows' dH, within the tolerance rule."""
    batch = make_fused_batch(14, num_sequences=6)
    options = kto_jax.KTOOptions(beta=0.5, undesirable_weight=1.33)
    ref, kl_ref, *_ = reference(batch, options)
    kl_logp, kl_n = kl_logprobs(batch, options)
    offsets, targets = batch["offsets"], batch["targets"]
    rows = np.arange(len(targets))
    scored = (targets != -100) & (rows >= offsets[0]) & (rows < offsets[-1])
    assert 0 < scored.sum() < len(rows)  # rows to drop
    compact_offsets = np.concatenate([[0], np.cumsum(
        [scored[offsets[s]:offsets[s + 1]].sum() for s in range(len(offsets) - 1)])])

    def loss(h, w, b, targets, offsets):
        return kto_jax.fused_linear_kto_loss(
            h, w, targets, offsets.astype(np.int32), ref, batch["desirable"], b,
            options=options, kl_policy_logp=kl_logp, kl_reference_logp=kl_ref,
            kl_num_tokens=kl_n)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (l1, m1), g1 = grad(batch["hidden"], batch["weight"], batch["bias"], targets, offsets)
    (l2, m2), g2 = grad(batch["hidden"][scored], batch["weight"], batch["bias"],
                        targets[scored], compact_offsets)
    z = transformed(logits64(batch, batch["hidden"], batch["weight"], batch["bias"]), options)
    scale = 1.0 + float(jnp.abs(z).max()) * batch["hidden"].shape[0]
    assert abs(float(l1) - float(l2)) <= RTOL * scale * options.beta
    for name in ("kl", "rewards/chosen", "rewards/rejected", "per_example/logp",
                 "per_example/grad_logp"):
        np.testing.assert_allclose(m2[name], m1[name], rtol=0, atol=RTOL * scale)
    np.testing.assert_array_equal(m2["per_example/num_tokens"], m1["per_example/num_tokens"])
    assert np.all(np.asarray(g1[0])[~scored] == 0)
    gmax = float(jnp.abs(g1[1]).max()) + float(jnp.abs(g1[0]).max())
    for got, want in ((g2[0], np.asarray(g1[0])[scored]), (g2[1], g1[1]), (g2[2], g1[2])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=RTOL * gmax)


@pytest.mark.parametrize("strategy", ["keep_chunk", "recompute"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_statistics_match_reference(strategy, dtype):
    """test_jax.py's rule, with each row's magnitude of the products (max over v of
    Σ_d |h_d W_vd| + |b_v|) added to both scales, as test_torch_token_statistics does."""
    batch = make_fused_batch(23, dim=9, vocab=37, dtype=dtype)
    plain = kto_jax.KTOOptions(beta=0.4, logit_scale=1.2, logit_softcap=3.0, temperature=0.9)
    options = dataclasses.replace(plain, token_statistics=True)
    ref, kl_ref = np.full(5, -20, np.float32), np.full(4, -21, np.float32)
    kw = dict(strategy=strategy, chunk_bytes=4 * 37 * 3)
    loss, metrics, grads = run(batch, ref, kl_ref, options, **kw)
    loss0, metrics0, grads0 = run(batch, ref, kl_ref, plain, **kw)
    assert float(loss) == float(loss0) and "per_example/entropy_sum" not in metrics0
    for g, g0 in zip(grads, grads0, strict=True):
        assert np.array_equal(np.asarray(g), np.asarray(g0))
    h, w, b = (np.asarray(x, np.float64) for x in (batch["hidden"], batch["weight"],
                                                   batch["bias"]))
    products = (np.abs(h)[:, None, :] * np.abs(w)[None, :, :]).sum(-1) + np.abs(b)[None, :]
    extra = products.max(-1)
    z = logits64(batch, batch["hidden"], batch["weight"], batch["bias"])
    ent, ent_scale, mean, mean_scale = reference_token_statistics(z, batch, options)
    scored = (batch["seq_of_row"] < 5) & (batch["targets"] != -100)
    extra_sum = jax.ops.segment_sum(jnp.where(scored, extra, 0.0), batch["seq_of_row"],
                                    num_segments=6)[:5]
    assert_statistic(metrics["per_example/entropy_sum"], ent, ent_scale + extra_sum)
    assert_statistic(metrics["per_example/mean_logit_sum"], mean, mean_scale + extra_sum)


def test_the_cpu_handler_takes_dw_in_float32_only():
    """A direct call of the FFI target asking for dW in bfloat16 (what vocab_blocks gives on
    CUDA) with a CPU strategy is refused by name."""
    from kto_jax._library import _call
    from kto_jax.functional import _head, _step_results
    batch = make_fused_batch(10)
    h, w, b = _head(batch["hidden"], batch["weight"], batch["bias"])
    options = kto_jax.KTOOptions(reference_point="zero")
    n, d, v = h.shape[0], h.shape[1], w.shape[0]
    results = _step_results(n, 5, options) + (
        jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((v, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((v,), jnp.float32))
    call = _call("kto_fused_linear_step", results, options=options.values(),
                 vocab_total=np.int64(0), chunk_bytes=np.int64(1 << 20), strategy=np.int32(0))
    with pytest.raises(Exception, match=r"kto_jax.fused_linear_kto_loss: argument 'd_weight' "
                                        r"\(the dW result\) must be float32 on cpu .*; got "
                                        r"bfloat16"):
        jax.block_until_ready(call(
            h, w, b, jnp.asarray(batch["targets"]), jnp.asarray(batch["offsets"]),
            jnp.zeros(5, jnp.float32), jnp.asarray(batch["desirable"]),
            jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32),
            jnp.zeros((1,), jnp.int32)))
