"""kto_torch's fused op with a frozen head (issue 25, item 1): when the lm_head's weight (and
bias) need no gradient, the op asks the library for no dW (db), returns an empty [0, D]
tensor in dW's place (no [V, D] fp32 array), and autograd gives the weight no gradient.
dH, the loss, the metrics and every per-example output are bit for bit those of the run
that computes dW (the library's dH product never reads dW's), and within the float64
reference's rule of test_torch_fused.py.
"""

import pytest

torch = pytest.importorskip("torch")
kto_torch = pytest.importorskip("kto_torch")

from test_torch_fused import assert_matches, kl_logprobs, make_problem, reference  # noqa: E402

OPTIONS = dict(beta=0.3, undesirable_weight=1.33)


def on(p, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in p.items()}


def run(p, frozen_weight, frozen_bias, strategy="keep_chunk", chunk_bytes=None, **o):
    h = p["hidden"].detach().clone().requires_grad_(True)
    w = p["weight"].detach().clone().requires_grad_(not frozen_weight)
    b = p["bias"]
    b = b.detach().clone().requires_grad_(not frozen_bias) if b is not None else None
    out = kto_torch.fused_linear_kto_loss(
        h, w, p["targets"], None, p["reference_logp"], p["desirable"], bias=b,
        **kl_logprobs(p), strategy=strategy, chunk_bytes=chunk_bytes, **OPTIONS, **o)
    out.loss.backward()
    return out, h.grad, w.grad, (b.grad if b is not None else None)


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("strategy,chunk_bytes", [("keep_chunk", None), ("keep_chunk", 2048),
                                                  ("recompute", 2048)])
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_head_equals_the_full_run_bit_for_bit(dtype, strategy, chunk_bytes, bias):
    p = make_problem(3, B=5, T=7, D=16, V=53, dtype=dtype, bias=bias)
    kw = dict(strategy=strategy, chunk_bytes=chunk_bytes, token_statistics=True)
    full, fh, fw, fb = run(p, False, False, **kw)
    frozen, zh, zw, zb = run(p, True, True, **kw)
    assert zw is None and zb is None  # the frozen parameters get no gradient
    assert fw is not None and (fb is not None) == bias
    assert same(zh, fh)
    assert full.loss.item() == frozen.loss.item()
    for key, value in full.metrics.items():
        assert same(frozen.metrics[key], value), key
    for name in ("logp", "ratio", "reward", "example_loss", "grad_logp", "num_tokens",
                 "entropy_sum", "mean_logit_sum"):
        assert same(getattr(frozen, name), getattr(full, name)), name
    # And within the float64 reference's rule (test_torch_fused.assert_matches: the loss, logp,
    # kl and dH; dW and db there are the full run's, which that rule also holds).
    assert_matches(p, OPTIONS, (frozen, zh, fw, fb), reference(p, OPTIONS), 0.0)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: the CUDA frozen head is untested here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["keep_chunk", "recompute", "vocab_blocks"])
def test_cuda_frozen_head_equals_the_full_run(dtype, strategy):
    """On CUDA the library launches no dW GEMM and no db GEMV for an empty d_weight /
    d_bias; dH, the loss and the metrics are the full run's, bit for bit."""
    assert kto_torch._C.has_cuda(), "kto_torch was built without its CUDA kernels"
    p = on(make_problem(7, B=5, T=9, D=32, V=211, dtype=dtype, bias=True), "cuda")
    kw = dict(strategy=strategy, chunk_bytes=1 << 14)
    full, fh, fw, fb = run(p, False, False, **kw)
    frozen, zh, zw, zb = run(p, True, True, **kw)
    assert zw is None and zb is None and fw is not None and fb is not None
    assert same(zh, fh)
    assert full.loss.item() == frozen.loss.item()
    for key, value in full.metrics.items():
        assert same(frozen.metrics[key], value), key
    assert same(frozen.grad_logp, full.grad_logp)


def test_the_op_returns_an_empty_dw_and_no_v_by_d_array():
    """The op's outputs: dW [0, D] (and db [0]) when weight_grad / bias_grad are False, so
    no fp32 [V, D] buffer is held; the fake kernel agrees (torch.compile, meta tensors)."""
    p = make_problem(5, B=3, T=5, D=8, V=29, bias=True)
    h, w, b = p["hidden"].reshape(-1, 8), p["weight"], p["bias"]
    offsets = torch.arange(0, 16, 5)
    logp = kl_logprobs(p)
    kl = (logp["kl_policy_logp"], logp["kl_reference_logp"], logp["kl_num_tokens"], None)
    args = (h, w, b, p["targets"].reshape(-1), offsets, p["reference_logp"][:3],
            p["desirable"][:3], *kl, kto_torch._options(beta=0.1), 1 << 20, 0)
    full = torch.ops.kto.fused_linear_forward(*args)
    frozen = torch.ops.kto.fused_linear_forward(*args, False, False)
    assert full[4].shape == (29, 8) and full[5].shape == (29,)
    assert frozen[4].shape == (0, 8) and frozen[5].shape == (0,)
    assert frozen[4].untyped_storage().nbytes() == 0
    assert same(frozen[3], full[3])
    weight_only = torch.ops.kto.fused_linear_forward(*args, True, False)
    assert same(weight_only[4], full[4]) and weight_only[5].shape == (0,)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    fake = torch.ops.kto.fused_linear_forward(*meta, False, False)
    assert fake[4].shape == (0, 8) and fake[5].shape == (0,)
    torch.library.opcheck(torch.ops.kto.fused_linear_forward.default, (*args, False, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_a_trainable_bias_on_a_frozen_weight_gets_its_gradient():
    p = make_problem(7, bias=True)
    full, fh, _, fb = run(p, False, False)
    _, zh, zw, zb = run(p, True, False)
    assert zw is None and same(zb, fb) and same(zh, fh)


def test_under_no_grad_nothing_is_asked_for_the_head():
    p = make_problem(9)
    w = p["weight"].clone().requires_grad_(True)
    with torch.no_grad():
        out = kto_torch.fused_linear_kto_loss(
            p["hidden"], w, p["targets"], None, p["reference_logp"], p["desirable"],
            bias=p["bias"], **kl_logprobs(p))
    assert w.grad is None and torch.isfinite(out.loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_under_torch_compile(dtype):
    p = make_problem(11, bias=False)
    kl = kl_logprobs(p, weight=p["weight"].to(dtype), dtype=dtype)

    def step(h, w):
        return kto_torch.fused_linear_kto_loss(
            h, w, p["targets"], None, p["reference_logp"], p["desirable"], **kl).loss

    h = p["hidden"].to(dtype).requires_grad_(True)
    w = p["weight"].to(dtype)  # frozen
    eager = step(h, w)
    eager.backward()
    want = h.grad.clone()
    h.grad = None
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(h, w)
    compiled.backward()
    assert w.grad is None and compiled.item() == eager.item() and same(h.grad, want)
