"""kto_jax's CUDA handlers against its CPU handlers on the same inputs (loss, metrics and
gradients within the fp32 rule of test_jax.py). Skipped where no GPU or no CUDA build of
kto_jax exists: the CUDA handlers are compiled at install time wherever nvcc is present,
and have not run on a GPU yet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kto_jax


def _cuda_devices():
    try:
        return jax.devices("cuda")
    except RuntimeError:
        return []


pytestmark = pytest.mark.skipif(
    not _cuda_devices() or kto_jax.cuda_library() is None,
    reason="no CUDA device visible to JAX, or kto_jax was installed without nvcc "
    "(its CUDA handlers are compiled but have not run here)")


def _on(device, x):
    return None if x is None else jax.device_put(x, device)


def _problem(dtype):
    rng = np.random.default_rng(0)
    B, T, D, V = 4, 6, 32, 257
    labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
    labels[:, :2] = -100
    return dict(
        hidden=jnp.asarray(rng.normal(size=(B, T, D)), dtype),
        weight=jnp.asarray(rng.normal(size=(V, D)) * 0.2, dtype),
        bias=jnp.asarray(rng.normal(size=(V,)) * 0.1, dtype),
        labels=labels,
        ref=np.full(B, -20.0, np.float32),
        des=np.array([1, 0, 1, 0], np.uint8),
        kl_hidden=jnp.asarray(rng.normal(size=(B, T, D)), dtype),
        kl_ref=np.full(B, -21.0, np.float32),
    )


@pytest.mark.parametrize("transform", [(1.0, 0.0, 1.0), (1.2, 2.0, 0.9)], ids=["plain", "softcap"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cuda_fused_and_logits_ops_match_the_cpu(dtype, transform):
    """Loss, kl and gradients within tol of the CPU's (bf16: its unit roundoff, twice: dZ is
    rounded to bf16 on CUDA before the gradient GEMMs). The token statistics, per-sequence
    sums of T per-token values each computed in fp32 from the same logits z': within tol of
    the magnitude they come from, T (1 + 2 max|z'|) (entropy from z' − max z' over the row;
    mean logit from Σ z' / V)."""
    p = _problem(dtype)
    scale, cap, tau = transform
    opts = kto_jax.KTOOptions(beta=0.3, logit_scale=scale, logit_softcap=cap, temperature=tau,
                              token_statistics=True)

    def fused(h, w, b, klh, strategy="keep_chunk"):
        lp, n = kto_jax.fused_linear_logprobs(klh, w, p["labels"], None, b, logit_scale=scale,
                                              logit_softcap=cap, temperature=tau)
        return kto_jax.fused_linear_kto_loss(h, w, p["labels"], None, p["ref"], p["des"], b,
                                             options=opts, kl_policy_logp=lp,
                                             kl_reference_logp=p["kl_ref"], kl_num_tokens=n,
                                             strategy=strategy)

    def logits(z, klz):
        lp, n = kto_jax.sequence_logprobs(klz, p["labels"], logit_scale=scale,
                                          logit_softcap=cap, temperature=tau)
        return kto_jax.kto_loss(z, p["labels"], None, p["ref"], p["des"], lp, p["kl_ref"], n, opts)

    results = {}
    for name, dev in (("cpu", jax.devices("cpu")[0]), ("cuda", _cuda_devices()[0])):
        args = [_on(dev, p[k]) for k in ("hidden", "weight", "bias", "kl_hidden")]
        (l1, m1), g1 = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2), has_aux=True))(*args)
        z = jnp.einsum("btd,vd->btv", args[0], args[1]) + args[2]
        klz = jnp.einsum("btd,vd->btv", args[3], args[1]) + args[2]
        (l2, m2), g2 = jax.jit(jax.value_and_grad(logits, has_aux=True))(z, klz)
        results[name] = (l1, m1["kl"], g1, l2, m2["kl"], g2,
                         [m[k] for m in (m1, m2) for k in ("per_example/entropy_sum",
                                                            "per_example/mean_logit_sum")])
    cpu, gpu = results["cpu"], results["cuda"]
    tol = 1e-5 if dtype == jnp.float32 else 2.0**-7
    for a, b in ((cpu[0], gpu[0]), (cpu[1], gpu[1]), (cpu[3], gpu[3]), (cpu[4], gpu[4])):
        np.testing.assert_allclose(float(b), float(a), rtol=tol, atol=1e-6)
    h, w, bias = (np.asarray(p[k], np.float64) for k in ("hidden", "weight", "bias"))
    z_max = np.abs(h @ w.T + bias).max() * scale / tau  # bounds |z'| (tanh shrinks)
    magnitude = p["labels"].shape[1] * (1 + 2 * z_max)
    for a, b in zip(cpu[6], gpu[6], strict=True):  # token statistics, fused then logits
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.all(np.abs(a - b) <= tol * np.maximum(np.abs(a), magnitude))
    for a, b in zip(list(cpu[2]) + [cpu[5]], list(gpu[2]) + [gpu[5]], strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= tol * np.abs(a).max() + 1e-7


def _flat(p):
    B, T = p["labels"].shape
    return (p["hidden"].reshape(B * T, -1), jnp.asarray(p["labels"].reshape(-1)),
            jnp.arange(B + 1, dtype=jnp.int32) * T)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cuda_vocab_blocks_matches_the_cpu_keep_chunk(dtype):
    """vocab_blocks (CUDA only) gives the CPU step's loss and gradients. Its dW is written in
    the input dtype (each block rounded once: the op's declared result, which the handler
    follows), so the bf16 rule allows one more rounding than keep_chunk's fp32 dW."""
    p = _problem(dtype)
    opts = kto_jax.KTOOptions(beta=0.3, reference_point="zero")

    def loss(h, w, b, strategy):
        return kto_jax.fused_linear_kto_loss(h, w, p["labels"], None, p["ref"], p["des"], b,
                                             options=opts, strategy=strategy)[0]

    results = []
    for dev, strategy in ((jax.devices("cpu")[0], "keep_chunk"),
                          (_cuda_devices()[0], "vocab_blocks")):
        args = [_on(dev, p[k]) for k in ("hidden", "weight", "bias")]
        results.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)),
                               static_argnums=3)(*args, strategy))
    (l1, g1), (l2, g2) = results
    tol = 1e-5 if dtype == jnp.float32 else 2.0**-7
    np.testing.assert_allclose(float(l2), float(l1), rtol=tol, atol=1e-6)
    for a, b in zip(g1, g2, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= tol * np.abs(a).max() + 1e-7


def test_cuda_vocab_slices_match_the_cpu():
    """Vocab parallel on one device: the head cut into two slices by hand, each slice's row
    partials (fused_linear_row_partials), stacked as the all-gather would, then each slice's
    step — on CUDA as on the CPU: the same loss, dH summed over the slices, each dW slice."""
    from kto_jax.functional import _empty, _fused_step, _head, _row_partials

    p = _problem(jnp.float32)
    opts = kto_jax.KTOOptions(beta=0.3, reference_point="zero")
    V = p["weight"].shape[0]
    cut = [(0, 128), (128, V)]
    chunk = 1 << 20
    results = []
    for dev in (jax.devices("cpu")[0], _cuda_devices()[0]):
        hidden, targets, offsets = (_on(dev, x) for x in _flat(p))
        h, w, b = _head(hidden, _on(dev, p["weight"]), _on(dev, p["bias"]))
        begins = [_on(dev, jnp.asarray([lo], jnp.int32)) for lo, _ in cut]
        partials = [_row_partials(h, w[lo:hi], b[lo:hi], targets, offsets, begin, V, opts, chunk)
                    for (lo, hi), begin in zip(cut, begins, strict=True)]
        gathered = jnp.stack(partials)
        steps = [_fused_step((opts, V, chunk, "keep_chunk"), h, w[lo:hi], b[lo:hi], targets,
                             offsets, _on(dev, p["ref"]), _on(dev, p["des"]), _on(dev, _empty()),
                             gathered, begin)
                 for (lo, hi), begin in zip(cut, begins, strict=True)]
        results.append((steps[0][0][0], steps[1][0][0], steps[0][5] + steps[1][5],
                        jnp.concatenate([steps[0][6], steps[1][6]])))
    cpu, gpu = results
    assert float(cpu[0]) == float(cpu[1])  # every slice computes the same loss
    for a, b in zip(cpu, gpu, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.abs(a - b).max() <= 1e-5 * max(np.abs(a).max(), 1.0)
