"""kto_jax under jax.sharding on 4 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4,
set by conftest.py): data parallel (the batch sharded with shard_map, the KL partial
(S, C) psum'd between the phases) and vocab parallel (the lm_head sharded over the
vocabulary, every row's (lse, target logit) partials all-gathered and merged by the
library), each against the unsharded step on the same inputs.

Tolerances: data parallel, the loss within 1e-6 relative and every gradient element
within 1e-6 of the largest (the psum'd S is float32; the rest is the same arithmetic);
vocab parallel, the loss within 1e-6 relative and dH, dW, db within 1e-5 of the largest
element (the lse is merged from slices instead of one pass over the row); the KL batch's
log-probs (fused_linear_logprobs over the slices) within 1e-5 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import kto_jax

jax.config.update("jax_enable_x64", True)

DEVICES = 4
pytestmark = pytest.mark.skipif(
    jax.device_count() < DEVICES,
    reason=f"needs {DEVICES} devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=4 "
    "(tests/python/conftest.py sets it unless XLA_FLAGS is already set)")


def problem(seed, B=8, T=5, D=6, V=16, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
    labels[:, :2] = -100  # prompt
    labels[rng.random((B, T)) < 0.1] = -100
    kl_labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
    kl_labels[:, :2] = -100
    kl_labels[3, :] = -100  # an empty KL example (counts only for kl_estimator="mean")
    return dict(
        hidden=jnp.asarray(rng.normal(size=(B, T, D)), dtype),
        weight=jnp.asarray(rng.normal(size=(V, D)) * 0.5, dtype),
        bias=jnp.asarray(rng.normal(size=(V,)) * 0.2, dtype),
        labels=labels,
        reference_logp=jnp.asarray(rng.normal(-8, 1, size=B), jnp.float32),
        desirable=np.array([1, 0, 0, 1, 1, 0, 1, 1], np.uint8)[:B],
        kl_hidden=jnp.asarray(rng.normal(size=(B, T, D)), dtype),
        kl_labels=kl_labels,
        kl_reference_logp=jnp.asarray(rng.normal(-14, 1, size=B), jnp.float32),  # z0 > 0
    )


def mesh(name):
    return Mesh(np.array(jax.devices()[:DEVICES]), (name,))


def close(got, want, rel):
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape
        assert np.abs(g - w).max() <= rel * np.abs(w).max(), np.abs(g - w).max()


@pytest.mark.parametrize("kl_estimator", ["mean", "nonempty_mean"])
def test_data_parallel_logits_equals_the_unsharded_step(kl_estimator):
    p = problem(1)
    B = p["labels"].shape[0]
    logits = jnp.einsum("btd,vd->btv", p["hidden"], p["weight"]) + p["bias"]
    kl_logp, kl_n = kto_jax.sequence_logprobs(
        jnp.einsum("btd,vd->btv", p["kl_hidden"], p["weight"]), p["kl_labels"])
    opts = kto_jax.KTOOptions(beta=0.5, kl_estimator=kl_estimator, mean_denominator=B)
    rest = (p["labels"], p["reference_logp"], p["desirable"], kl_logp, p["kl_reference_logp"],
            kl_n)

    def whole(z):
        return kto_jax.kto_loss(z, rest[0], None, *rest[1:], opts)

    def sharded(z):
        def local(z, labels, ref, des, klp, klr, kln):
            loss, m = kto_jax.kto_loss(z, labels, None, ref, des, klp, klr, kln, opts,
                                       kl_axis_name="dp")
            return jax.lax.psum(loss, "dp"), m["kl"].reshape(1)  # z0: every device's

        return jax.shard_map(local, mesh=mesh("dp"), in_specs=P("dp"),
                             out_specs=(P(), P("dp")))(z, *rest)

    (l1, m1), g1 = jax.value_and_grad(whole, has_aux=True)(logits)
    (l2, kl2), g2 = jax.jit(jax.value_and_grad(sharded, has_aux=True))(logits)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)
    np.testing.assert_allclose(kl2, np.full(DEVICES, float(m1["kl"])), rtol=1e-6, atol=1e-7)
    assert float(m1["kl"]) > 0  # the clamp did not hide the estimate
    close([g2], [g1], 1e-6)


def kl_logprobs(klh, w, kll, b, opts, vocab_axis_name=None):
    """The KL batch's log-probs as a user computes them (forward only)."""
    return kto_jax.fused_linear_logprobs(klh, w, kll, None, b, logit_scale=opts.logit_scale,
                                         logit_softcap=opts.logit_softcap,
                                         temperature=opts.temperature,
                                         vocab_axis_name=vocab_axis_name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_data_parallel_fused_equals_the_unsharded_step(dtype):
    p = problem(2, dtype=dtype)
    B = p["labels"].shape[0]
    opts = kto_jax.KTOOptions(beta=0.5, mean_denominator=B)

    def loss(h, w, b, *, kl_axis_name=None, labels=p["labels"], ref=p["reference_logp"],
             des=p["desirable"], klh=p["kl_hidden"], kll=p["kl_labels"],
             klr=p["kl_reference_logp"]):
        kl_logp, kl_n = kl_logprobs(klh, w, kll, b, opts)
        return kto_jax.fused_linear_kto_loss(h, w, labels, None, ref, des, b, options=opts,
                                             kl_policy_logp=kl_logp, kl_reference_logp=klr,
                                             kl_num_tokens=kl_n, kl_axis_name=kl_axis_name)[0]

    def sharded(h, w, b):
        def local(h, labels, ref, des, klh, kll, klr, w, b):
            return loss(h, w, b, kl_axis_name="dp", labels=labels, ref=ref, des=des, klh=klh,
                        kll=kll, klr=klr).reshape(1)  # this device's share of the loss

        data = (h, p["labels"], p["reference_logp"], p["desirable"], p["kl_hidden"],
                p["kl_labels"], p["kl_reference_logp"])
        return jax.shard_map(local, mesh=mesh("dp"), in_specs=(P("dp"),) * 7 + (P(), P()),
                             out_specs=P("dp"))(*data, w, b).sum()

    args = (p["hidden"], p["weight"], p["bias"])
    l1, g1 = jax.value_and_grad(loss, argnums=(0, 1, 2))(*args)
    l2, g2 = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(*args)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)
    # bf16 gradients: each device's fp32 dW is rounded to bf16 before the psum.
    close(g2, g1, 1e-6 if dtype == jnp.float32 else 2.0**-7)


@pytest.mark.parametrize("transform", [(1.0, 0.0, 1.0), (1.2, 2.0, 0.9)], ids=["plain", "softcap"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_vocab_parallel_fused_equals_the_unsharded_step(dtype, bias, transform):
    """With a logit transform too: each slice's partials are of the transformed logits. The
    KL log-probs come from fused_linear_logprobs over the same slices."""
    p = problem(3, V=20, dtype=dtype)
    a, c, tau = transform
    opts = kto_jax.KTOOptions(beta=0.5, undesirable_weight=1.33, logit_scale=a, logit_softcap=c,
                              temperature=tau)
    rest = (p["labels"], None, p["reference_logp"], p["desirable"])

    def step(h, w, b, vocab_axis_name=None):
        kl_logp, kl_n = kl_logprobs(p["kl_hidden"], w, p["kl_labels"], b, opts, vocab_axis_name)
        loss, metrics = kto_jax.fused_linear_kto_loss(
            h, w, *rest, b, options=opts, kl_policy_logp=kl_logp,
            kl_reference_logp=p["kl_reference_logp"], kl_num_tokens=kl_n,
            vocab_axis_name=vocab_axis_name)
        return loss, dict(metrics, kl_logp=kl_logp)

    def sharded(h, w, b):
        in_specs = (P(), P("tp"), P("tp") if b is not None else None)
        return jax.shard_map(lambda h, w, b: step(h, w, b, "tp"), mesh=mesh("tp"),
                             in_specs=in_specs, out_specs=(P(), P()))(h, w, b)

    b = p["bias"] if bias else None
    argnums = (0, 1, 2) if bias else (0, 1)
    (l1, m1), g1 = jax.value_and_grad(step, argnums=argnums, has_aux=True)(
        p["hidden"], p["weight"], b)
    (l2, m2), g2 = jax.jit(jax.value_and_grad(sharded, argnums=argnums, has_aux=True))(
        p["hidden"], p["weight"], b)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)
    np.testing.assert_allclose(m2["kl_logp"], m1["kl_logp"], rtol=1e-5)
    np.testing.assert_allclose(float(m2["kl"]), float(m1["kl"]), rtol=1e-5, atol=1e-6)
    assert float(m1["kl"]) > 0  # the clamp did not hide the estimate
    np.testing.assert_allclose(m2["per_example/logp"], m1["per_example/logp"], rtol=1e-5)
    close(g2, g1, 1e-5 if dtype == jnp.float32 else 2.0**-7)


def test_vocab_parallel_over_one_device_equals_the_unsharded_step():
    """A vocab axis of one device (tp = 1 in a config written for more): the head is whole,
    its one slice's gathered partials are not needed, and the step is the unsharded one."""
    p = problem(5, V=20)
    opts = kto_jax.KTOOptions(beta=0.5, reference_point="zero")
    rest = (p["labels"], None, p["reference_logp"], p["desirable"])

    def step(h, w, b, vocab_axis_name=None):
        return kto_jax.fused_linear_kto_loss(h, w, *rest, b, options=opts,
                                             vocab_axis_name=vocab_axis_name)[0]

    one = Mesh(np.array(jax.devices()[:1]), ("tp",))
    sharded = jax.shard_map(lambda h, w, b: step(h, w, b, "tp"), mesh=one,
                            in_specs=(P(), P("tp"), P("tp")), out_specs=P())
    args = (p["hidden"], p["weight"], p["bias"])
    l1, g1 = jax.value_and_grad(step, argnums=(0, 1, 2))(*args)
    l2, g2 = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(*args)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)
    close(g2, g1, 1e-5)


@pytest.mark.parametrize("average", [False, True])
def test_vocab_parallel_logprobs_equal_the_whole_head(average):
    p = problem(5, V=24)
    args = (p["hidden"], p["weight"], p["labels"], None, p["bias"])
    kw = dict(average_logprob=average, logit_softcap=2.0)
    logp1, n1 = kto_jax.fused_linear_logprobs(*args, **kw)
    logp2, n2 = jax.jit(jax.shard_map(
        lambda h, w, t, b: kto_jax.fused_linear_logprobs(h, w, t, None, b, vocab_axis_name="tp",
                                                         **kw),
        mesh=mesh("tp"), in_specs=(P(), P("tp"), P(), P("tp")), out_specs=(P(), P())))(
        p["hidden"], p["weight"], p["labels"], p["bias"])
    np.testing.assert_allclose(logp2, logp1, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(n2, n1)


def test_vocab_and_data_parallel_together_equal_the_unsharded_step():
    """A 2 × 2 mesh: the batch over "dp", the head over "tp"; the KL log-probs over the
    slices, their (S, C) psum'd over "dp"."""
    p = problem(4, V=20)
    B = p["labels"].shape[0]
    opts = kto_jax.KTOOptions(beta=0.5, mean_denominator=B)

    def step(h, w, b, labels, ref, des, klh, kll, klr, kl_axis_name=None, vocab_axis_name=None):
        kl_logp, kl_n = kl_logprobs(klh, w, kll, b, opts, vocab_axis_name)
        return kto_jax.fused_linear_kto_loss(h, w, labels, None, ref, des, b, options=opts,
                                             kl_policy_logp=kl_logp, kl_reference_logp=klr,
                                             kl_num_tokens=kl_n, kl_axis_name=kl_axis_name,
                                             vocab_axis_name=vocab_axis_name)

    data = (p["labels"], p["reference_logp"], p["desirable"], p["kl_hidden"], p["kl_labels"],
            p["kl_reference_logp"])

    def whole(h, w, b):
        return step(h, w, b, *data)[0]

    def sharded(h, w, b):
        def local(h, w, b, *d):
            loss, _ = step(h, w, b, *d, kl_axis_name="dp", vocab_axis_name="tp")
            return jax.lax.psum(loss, "dp")

        grid = Mesh(np.array(jax.devices()[:DEVICES]).reshape(2, 2), ("dp", "tp"))
        return jax.shard_map(local, mesh=grid,
                             in_specs=(P("dp"), P("tp"), P("tp")) + (P("dp"),) * 6,
                             out_specs=P())(h, w, b, *data)

    args = (p["hidden"], p["weight"], p["bias"])
    l1, g1 = jax.value_and_grad(whole, argnums=(0, 1, 2))(*args)
    l2, g2 = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(*args)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)
    close(g2, g1, 1e-5)


def test_token_statistics_with_vocab_parallel_is_refused():
    p = problem(4)
    opts = kto_jax.KTOOptions(token_statistics=True)
    with pytest.raises(NotImplementedError, match="'options.token_statistics' must be False "
                                                  "with vocab_axis_name"):
        kto_jax.fused_linear_kto_loss(p["hidden"], p["weight"], p["labels"], None,
                                      p["reference_logp"], p["desirable"], options=opts,
                                      vocab_axis_name="tp")


def test_vocab_blocks_with_vocab_parallel_is_refused():
    p = problem(4)
    with pytest.raises(ValueError, match=r"argument 'strategy' must be 'keep_chunk' or "
                                         r"'recompute' with vocab_axis_name"):
        kto_jax.fused_linear_kto_loss(p["hidden"], p["weight"], p["labels"], None,
                                      p["reference_logp"], p["desirable"],
                                      options=kto_jax.KTOOptions(reference_point="zero"),
                                      vocab_axis_name="tp", strategy="vocab_blocks")
