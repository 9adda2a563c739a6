"""Parity: on the same inputs kto_jax's ops equal kto_torch's (the PyTorch extension,
python/kto_torch) and both equal the float64 reference of test_jax.py / test_jax_fused.py.

Tolerance rule (tests/cpp/support.hpp): fp32 accumulation ≈ 1e-5 relative to the quantity's
condition scale; bf16 inputs are upcast exactly, so the two bindings of one library agree
to that rule, and a gradient stored in bf16 adds bf16's unit roundoff (2^-8) relative to
the value. Skipped with a message where kto_torch is not built.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kto_jax
from test_jax_fused import make_fused_batch, reference

torch = pytest.importorskip("torch")
kto_torch = pytest.importorskip(
    "kto_torch", reason="kto_torch (pip install --no-build-isolation ./python/kto_torch) is not "
    "built in this environment")

jax.config.update("jax_enable_x64", True)

RTOL = 1e-5
TORCH_DTYPES = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16}


def to_torch(x, dtype=None, grad=False):
    if x is None:
        return None
    a = np.asarray(jnp.asarray(x, jnp.float32)) if dtype is not None else np.asarray(x)
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(grad)


def assert_close(got, want, scale, unit_roundoff=0.0):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want)
    assert np.all(err <= RTOL * scale + unit_roundoff * np.abs(want)), err.max()


OPTIONS = [
    dict(beta=0.4, undesirable_weight=1.33),
    dict(beta=0.7, loss_type="apo_zero_unpaired", link="neg_log_sigmoid", reduction="sum"),
    dict(beta=0.2, kl_estimator="nonempty_mean", average_logprob=True, mean_denominator=9),
]


@pytest.mark.parametrize("dtype,unit_roundoff", [(jnp.float32, 0.0), (jnp.bfloat16, 2.0**-8)])
@pytest.mark.parametrize("opts", OPTIONS)
def test_fused_linear_matches_kto_torch_and_the_reference(dtype, unit_roundoff, opts):
    batch = make_fused_batch(21, dim=12, vocab=97, dtype=dtype)
    options = kto_jax.KTOOptions(**opts)
    ref, kl_ref, want_loss, _, want_grads, dz = reference(batch, options)
    if options.mean_denominator and options.reduction == "mean":  # the reference divides by B
        factor = len(batch["desirable"]) / options.mean_denominator
        want_loss, dz = want_loss * factor, dz * factor
        want_grads = [g * factor for g in want_grads]

    jax_kl_logp, jax_kl_n = kto_jax.fused_linear_logprobs(
        batch["kl_hidden"], batch["weight"], batch["kl_targets"], batch["kl_offsets"],
        batch["bias"], average_logprob=options.average_logprob)

    def f(h, w, b):  # the KL batch as log-probs, as kto_torch takes it
        return kto_jax.fused_linear_kto_loss(
            h, w, batch["targets"], batch["offsets"], ref, batch["desirable"], b,
            options=options, kl_policy_logp=jax_kl_logp, kl_reference_logp=kl_ref,
            kl_num_tokens=jax_kl_n)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(
        batch["hidden"], batch["weight"], batch["bias"])

    td = TORCH_DTYPES[dtype]
    h, w, b = (to_torch(batch[k], td, grad=True) for k in ("hidden", "weight", "bias"))
    with torch.no_grad():  # kto_torch takes the KL batch as its log-probs
        kl_logp, kl_n = kto_torch.fused_linear_logprobs(
            to_torch(batch["kl_hidden"], td), w, to_torch(batch["kl_targets"]).long(),
            to_torch(batch["kl_offsets"]).long(), b,
            average_logprob=opts.get("average_logprob", False))
    out = kto_torch.fused_linear_kto_loss(
        h, w, to_torch(batch["targets"]).long(), to_torch(batch["offsets"]).long(),
        to_torch(ref), to_torch(batch["desirable"]).bool(), b, kl_policy_logp=kl_logp,
        kl_reference_logp=to_torch(kl_ref), kl_num_tokens=kl_n, **opts)
    out.loss.backward()

    z = np.abs(np.asarray(batch["hidden"], np.float64)).max() * np.abs(
        np.asarray(batch["weight"], np.float64)).sum(axis=1).max()
    scale = (1.0 + z * batch["hidden"].shape[0]) * options.beta * 10
    assert abs(float(loss) - float(out.loss)) <= RTOL * scale
    assert abs(float(loss) - float(want_loss)) <= RTOL * scale
    for name in ("kl", "rewards/chosen", "rewards/rejected", "count/chosen"):
        a, t = float(metrics[name]), float(out.metrics[name])
        assert (np.isnan(a) and np.isnan(t)) or abs(a - t) <= RTOL * scale, name
    np.testing.assert_allclose(metrics["per_example/logp"], out.logp.numpy(), rtol=0,
                               atol=RTOL * scale)
    gmax = float(jnp.abs(dz).max()) + 1e-30
    for g, t, want in zip(grads, (h.grad, w.grad, b.grad), want_grads, strict=True):
        bound = gmax * 10 * np.abs(np.asarray(want)).max() / gmax
        assert_close(g.astype(jnp.float32), t.float().numpy(), bound, unit_roundoff)
        assert_close(g.astype(jnp.float32), want, bound * 10, unit_roundoff)


@pytest.mark.parametrize("dtype,unit_roundoff", [(jnp.float32, 0.0), (jnp.bfloat16, 2.0**-8)])
def test_logits_op_matches_kto_torch(dtype, unit_roundoff):
    from test_jax import make_batch

    batch = make_batch(22, vocab=41, dtype=dtype)
    ref = np.asarray(batch["rng"].normal(-15, 2, size=5), np.float32)
    opts = dict(beta=0.3, undesirable_weight=1.2, mean_denominator=7)
    options = kto_jax.KTOOptions(**opts)
    args = (batch["targets"], batch["offsets"], ref, batch["desirable"], batch["kl_policy_logp"],
            batch["kl_reference_logp"], batch["kl_num_tokens"])

    def f(z):
        return kto_jax.kto_loss(z, *args, options)

    (loss, metrics), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(batch["logits"])
    z = to_torch(batch["logits"], TORCH_DTYPES[dtype], grad=True)
    out = kto_torch.kto_loss(z, to_torch(args[0]).long(), to_torch(args[1]).long(),
                             to_torch(ref), to_torch(args[3]).bool(), to_torch(args[4]),
                             to_torch(args[5]), to_torch(args[6]).long(), **opts)
    out.loss.backward()
    scale = 1.0 + float(jnp.abs(batch["logits"].astype(jnp.float32)).max()) * 30
    assert abs(float(loss) - float(out.loss)) <= RTOL * scale * options.beta
    assert abs(float(metrics["kl"]) - float(out.metrics["kl"])) <= RTOL * scale
    gmax = float(np.abs(z.grad.float().numpy()).max())
    assert_close(grad.astype(jnp.float32), z.grad.float().numpy(), gmax * 10, unit_roundoff)


def test_both_bindings_read_the_library_contract():
    """Metric names, per-example row names, option names and the default chunk budgets have
    one home, the library's headers; both packages read them from their extensions."""
    assert kto_jax.METRIC_NAMES == kto_torch.METRIC_NAMES
    assert kto_jax.METRIC_NAMES[:2] == ("loss", "kl")
    assert kto_jax.PER_EXAMPLE_NAMES == kto_torch.EXAMPLE_OUTPUT_NAMES
    assert kto_jax.DEFAULT_CHUNK_BYTES == kto_torch._C.default_chunk_bytes(False)
    assert kto_jax.DEFAULT_CUDA_CHUNK_BYTES == kto_torch._C.default_chunk_bytes(True)


def test_both_bindings_expose_the_same_strategies_and_options():
    assert kto_jax.STRATEGIES == kto_torch.STRATEGIES
    assert tuple(kto_jax.OPTION_NAMES) == tuple(kto_torch.OPTION_NAMES)
    assert [f.name for f in dataclasses.fields(kto_jax.KTOOptions)] == list(kto_torch.OPTION_NAMES)
