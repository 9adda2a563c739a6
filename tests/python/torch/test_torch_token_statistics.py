"""Token statistics through kto_torch (token_statistics=True): each example's sums of its scored
tokens' entropy and mean logit, from the pass that computes the log-softmax, against the
float64 torch reference of the Python tests (kto_reference.token_statistics: H = lse − Σ p z,
which is −Σ p log p; mean = Σ z / V).

Tolerance rule (docs/math.md §7): fp32 accumulation at 1e-5 relative to the magnitude the sum
comes from: per token, 1 + the row's range (max z − min z) for the entropy, which the library
computes from z − max z, and mean |z| for the mean logit; the fused path adds the magnitude of
the products, Σ_d |h_d W_vd| + |b_v|, to both. The statistics leave the loss and the gradients
bit for bit as they are without them.
"""

import pytest

torch = pytest.importorskip("torch")
kto_torch = pytest.importorskip("kto_torch")

import kto_reference as kr  # noqa: E402
from test_torch import make_batch  # noqa: E402
from test_torch_fused import kl_logprobs, logits_of, make_problem  # noqa: E402
from test_torch_logit_transform import DEVICES, on  # noqa: E402


def reference(logits64, targets, product_scale=None):
    entropy, mean = kr.token_statistics(logits64)
    mask = (targets != -100).double()
    rng = logits64.amax(-1) - logits64.amin(-1)
    extra = product_scale if product_scale is not None else 0.0
    return ((entropy * mask).sum(-1), ((1 + rng + extra) * mask).sum(-1),
            (mean * mask).sum(-1), ((logits64.abs().mean(-1) + extra) * mask).sum(-1))


def assert_within(got, want, scale, rtol=1e-5):
    bound = rtol * torch.maximum(want.abs(), scale)
    assert bool(((got - want).abs() <= bound).all()), (got, want, bound)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_kto_loss_token_statistics(dtype, device):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernels take float32, float16 and bfloat16 logits")
    batch = make_batch(31, dtype=dtype)
    args = on(device, batch["logits"], batch["targets"], None, torch.full((4,), -20.0),
              batch["desirable"], batch["kl_policy"], batch["kl_reference"],
              batch["kl_num_tokens"])
    out = kto_torch.kto_loss(*args, token_statistics=True)
    plain = kto_torch.kto_loss(*args)
    assert plain.entropy_sum is None and plain.mean_logit_sum is None
    assert torch.equal(out.loss, plain.loss) and torch.equal(out.logp, plain.logp)
    h, hs, z, zs = reference(batch["logits"].double(), batch["targets"])
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.entropy_sum.dtype == torch.float64 and out.entropy_sum.shape == (4,)
    assert out.entropy_sum.device.type == device
    assert_within(out.entropy_sum.cpu(), h, hs, rtol)
    assert_within(out.mean_logit_sum.cpu(), z, zs, rtol)
    assert out.entropy_sum[2] == 0 and out.mean_logit_sum[2] == 0  # the all-ignored example


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["keep_chunk", "recompute"])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 3 * 4 * (41 + 12)], ids=["whole", "3_rows"])
def test_fused_linear_kto_loss_token_statistics(strategy, chunk_bytes, device):
    p = make_problem(32)
    bias, weight, targets, ref, desirable = on(
        device, p["bias"], p["weight"], p["targets"], p["reference_logp"], p["desirable"])
    kwargs = dict(bias=bias, chunk_bytes=chunk_bytes, strategy=strategy,
                  **kl_logprobs(p, device=device))
    h = p["hidden"].detach().clone().to(device).requires_grad_(True)
    out = kto_torch.fused_linear_kto_loss(h, weight, targets, None, ref, desirable,
                                          token_statistics=True, **kwargs)
    out.loss.backward()
    grad = h.grad.clone()
    h.grad = None
    plain = kto_torch.fused_linear_kto_loss(h, weight, targets, None, ref, desirable, **kwargs)
    plain.loss.backward()
    assert torch.equal(out.loss, plain.loss) and torch.equal(grad, h.grad)
    z64 = logits_of(p, p["hidden"].double(), p["weight"].double(), p["bias"].double())
    products = ((p["hidden"].double().abs() @ p["weight"].double().abs().T)
                + p["bias"].double().abs()).amax(-1)
    h_want, hs, z_want, zs = reference(z64, p["targets"], products)
    assert_within(out.entropy_sum.cpu(), h_want, hs)
    assert_within(out.mean_logit_sum.cpu(), z_want, zs)
