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


def run(batch, ref, kl_ref, options, jit=True, **kwargs):
    def f(h, w, b):
        return kto_jax.fused_linear_kto_loss(
            h, w, batch["targets"], batch["offsets"], ref, batch["desirable"], b,
            batch["kl_hidden"], batch["kl_targets"], batch["kl_offsets"], kl_ref, options,
            **kwargs)

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
    # Unscored rows: lse reported as 0, gradient exactly 0.
    unscored = (batch["seq_of_row"] == len(batch["desirable"])) | (batch["targets"] == -100)
    assert np.all(np.asarray(metrics["per_row/lse"])[unscored] == 0)
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

    def f(h, scale):
        loss, _ = kto_jax.fused_linear_kto_loss(
            h, batch["weight"], batch["targets"], batch["offsets"], ref, batch["desirable"],
            batch["bias"], batch["kl_hidden"], batch["kl_targets"], batch["kl_offsets"], kl_ref,
            opts)
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
    with pytest.raises(ValueError, match="strategy"):
        run(batch, np.zeros(5, np.float32), np.zeros(4, np.float32), kto_jax.KTOOptions(),
            strategy="fast")


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
