"""Logit transforms through kto_torch (logit_scale a, logit_softcap c, temperature τ): the ops
take the raw logits (or hidden states and the lm_head) and apply z' = c·tanh(a·z / c) / τ
(a·z / τ uncapped) before the log-softmax. Reference: the transform written here in float64
torch, differentiated by autograd (the chain rule independent of the library's), feeding the
untransformed float64 op (itself tested against plain torch in test_torch.py).

Tolerance rule (docs/math.md §7, as test_torch.py): fp32 accumulation at 1e-5 relative to the
magnitude a quantity comes from: the loss 1e-5 absolute (it is O(λ)), a log-prob Σ(|ℓ| + |lse|)
over its rows (times 1 + |a| / τ, the transform's largest derivative), a gradient element the
largest |∂L/∂z| of the tensor (which already carries the transform's derivative).
"""

import pytest

torch = pytest.importorskip("torch")
kto_torch = pytest.importorskip("kto_torch")

import kto_reference as kr  # noqa: E402
from test_torch import make_batch  # noqa: E402
from test_torch_fused import kl_logprobs, logits_of, make_problem  # noqa: E402

TRANSFORMS = [dict(logit_scale=0.5), dict(logit_softcap=2.0),
              dict(logit_scale=2.0, logit_softcap=5.0, temperature=0.7),
              dict(temperature=2.0), dict(logit_scale=-1.5)]
IDS = ["scale", "softcap", "all", "temperature", "negative_scale"]
# The CUDA kernels apply the same transform (skipped without a GPU).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


def on(device, *tensors):
    return [x.to(device) if isinstance(x, torch.Tensor) else x for x in tensors]


def transformed(z, logit_scale=1.0, logit_softcap=0.0, temperature=1.0):
    if logit_softcap:
        return logit_softcap * torch.tanh(logit_scale * z / logit_softcap) / temperature
    return logit_scale * z / temperature


def bound(t):
    return abs(t.get("logit_scale", 1.0)) / t.get("temperature", 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t", TRANSFORMS, ids=IDS)
def test_kto_loss_with_a_logit_transform(t, device):
    batch = make_batch(41)
    args = (batch["targets"], None, torch.full((4,), -20.0), batch["desirable"],
            batch["kl_policy"], batch["kl_reference"], batch["kl_num_tokens"])
    z = batch["logits"].detach().clone().to(device).requires_grad_(True)
    out = kto_torch.kto_loss(z, *on(device, *args), **t)
    out.loss.backward()
    z64 = batch["logits"].double().requires_grad_(True)
    want = kto_torch.kto_loss(transformed(z64, **t), *args)
    want.loss.backward()
    assert abs(out.loss.item() - want.loss.item()) <= 1e-5
    scale = float(want.logp.abs().sum()) + 1
    torch.testing.assert_close(out.logp.double().cpu(), want.logp, rtol=0, atol=1e-5 * scale)
    g_scale = float(z64.grad.abs().max()) + 1e-6
    torch.testing.assert_close(z.grad.double().cpu(), z64.grad, rtol=0, atol=1e-5 * g_scale)


@pytest.mark.parametrize("t", TRANSFORMS, ids=IDS)
def test_sequence_and_fused_logprobs_with_a_logit_transform(t):
    p = make_problem(42)
    z64 = logits_of(p, p["hidden"].double(), p["weight"].double(), p["bias"].double())
    want, _ = kr.sequence_logprobs(transformed(z64, **t), p["targets"])
    lsm = torch.log_softmax(transformed(z64, **t), dim=-1)
    mask = p["targets"] != -100
    scale = float((lsm.abs().amax(-1) * mask).sum()) + 1
    z32 = logits_of(p, p["hidden"], p["weight"], p["bias"])
    got, _ = kto_torch.sequence_logprobs(z32, p["targets"], **t)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * scale * (1 + bound(t)))
    fused, _ = kto_torch.fused_linear_logprobs(p["hidden"], p["weight"], p["targets"],
                                               bias=p["bias"], **t)
    torch.testing.assert_close(fused.double(), want, rtol=0, atol=1e-5 * scale * (1 + bound(t)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t", TRANSFORMS, ids=IDS)
def test_fused_linear_kto_loss_with_a_logit_transform(t, device):
    p = dict(make_problem(43), bias=None)
    targets, ref, desirable = on(device, p["targets"], p["reference_logp"], p["desirable"])
    kwargs = kl_logprobs(p, t, device)  # the KL batch's log-probs, under the same transform
    h = p["hidden"].detach().clone().to(device).requires_grad_(True)
    w = p["weight"].detach().clone().to(device).requires_grad_(True)
    out = kto_torch.fused_linear_kto_loss(h, w, targets, None, ref, desirable,
                                          chunk_bytes=3 * 4 * (41 + 12), **kwargs, **t)
    out.loss.backward()
    h64 = p["hidden"].double().requires_grad_(True)
    w64 = p["weight"].double().requires_grad_(True)
    kl_z = transformed(p["kl_hidden"].double() @ w64.detach().T, **t)
    kl_logp, kl_n = kto_torch.sequence_logprobs(kl_z, p["kl_targets"])
    want = kto_torch.kto_loss(transformed(h64 @ w64.T, **t), p["targets"], None,
                              p["reference_logp"].double(), p["desirable"], kl_logp,
                              p["kl_reference_logp"].double(), kl_n)
    want.loss.backward()
    assert abs(out.loss.item() - want.loss.item()) <= 1e-5
    for got, ref in ((h.grad, h64.grad), (w.grad, w64.grad)):
        g_scale = float(ref.abs().max()) + 1e-6
        torch.testing.assert_close(got.double().cpu(), ref, rtol=0, atol=1e-5 * g_scale)


def test_transform_options_are_checked():
    batch = make_batch(44)
    with pytest.raises(ValueError, match=r"kto_torch.sequence_logprobs: argument 'logit_softcap' "
                                         r"must be finite, >= 0"):
        kto_torch.sequence_logprobs(batch["logits"], batch["targets"], logit_softcap=-1.0)
    with pytest.raises(ValueError, match=r"argument 'temperature' must be finite"):
        kto_torch.sequence_logprobs(batch["logits"], batch["targets"], temperature=0.0)


def test_distributed_kto_loss_passes_the_transform_on(tmp_path):
    """kto_torch.distributed.kto_loss with a logit transform: on one gloo rank the step is
    kto_loss's (the KL batch's log-probs taken under the same transform)."""
    import torch.distributed as dist

    import kto_torch.distributed as kto_dist

    batch = make_batch(45)
    g = torch.Generator().manual_seed(46)
    kl_logits = torch.randn(4, 6, 29, generator=g) * 3
    kl_targets = torch.randint(0, 29, (4, 6), generator=g)
    kl_ref = torch.full((4,), -30.0)
    t = dict(logit_softcap=2.0, logit_scale=1.5)
    kl_logp, kl_n = kto_torch.sequence_logprobs(kl_logits, kl_targets, **t)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        got = kto_dist.kto_loss(batch["logits"], batch["targets"], None, torch.full((4,), -20.0),
                                batch["desirable"], kl_logp, kl_ref, kl_n, **t)
    finally:
        dist.destroy_process_group()
    want = kto_torch.kto_loss(batch["logits"], batch["targets"], None, torch.full((4,), -20.0),
                              batch["desirable"], kl_logp, kl_ref, kl_n, **t)
    assert torch.equal(got.metrics["kl"], want.metrics["kl"])
    assert torch.equal(got.loss, want.loss)
    # A transform changes the loss: the options reached the op.
    plain = kto_torch.kto_loss(batch["logits"], batch["targets"], None, torch.full((4,), -20.0),
                               batch["desirable"], kl_logp, kl_ref, kl_n)
    assert not torch.equal(plain.loss, want.loss)
