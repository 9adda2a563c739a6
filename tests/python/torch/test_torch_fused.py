"""kto_torch's fused-linear op against the logits-level op and a float64 reference.

The fused op takes hidden states and the lm_head; the reference materialises
logits = hidden @ weight.T + bias in float64 and differentiates a plain float64
KTO through it with autograd. Tolerance rule (docs/math.md §7, as in test_torch.py):
fp32 accumulation of the upcast inputs at 1e-5 relative to the magnitude the
quantity comes from (Σ|ℓ| + |lse| per sequence, Σ|∂L/∂Z| |W| for a gradient);
a gradient stored in bfloat16/float16 adds that type's unit roundoff, and so
does dZ on CUDA, where it is rounded to the input type before the two gradient
GEMMs.
"""

import pytest

torch = pytest.importorskip("torch")
kto_torch = pytest.importorskip("kto_torch")

from test_torch import UNIT_ROUNDOFF  # noqa: E402


def make_problem(seed, B=4, T=6, D=12, V=41, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 2 / D**0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[:, :2] = -100  # the prompt
    targets[torch.rand(B, T, generator=g) < 0.15] = -100
    desirable = torch.rand(B, generator=g) < 0.5
    kl_hidden = torch.randn(B, T, D, generator=g).to(dtype)
    kl_targets = torch.randint(0, V, (B, T), generator=g)
    kl_targets[:, :2] = -100
    reference_logp = torch.randn(B, generator=g) - 20
    kl_reference_logp = torch.randn(B, generator=g) - 21
    return dict(hidden=hidden, weight=weight, bias=b, targets=targets, desirable=desirable,
                kl_hidden=kl_hidden, kl_targets=kl_targets, reference_logp=reference_logp,
                kl_reference_logp=kl_reference_logp)


# The options that shape a sequence log-prob (the KL batch's as the target batch's).
LOGPROB_OPTIONS = ("average_logprob", "ignore_index", "logit_scale", "logit_softcap",
                   "temperature")


def kl_logprobs(p, o=None, device="cpu", weight=None, bias=None, dtype=None):
    """The KL batch of a make_problem() problem as both loss functions take it: its
    log-probs from its hidden states (in `dtype`, else as made; fused_linear_logprobs under
    no_grad, with the options that shape a log-prob), the reference log-probs and the token
    counts."""
    weight = p["weight"] if weight is None else weight
    bias = p["bias"] if bias is None else bias
    shaping = {k: v for k, v in (o or {}).items() if k in LOGPROB_OPTIONS}
    with torch.no_grad():
        logp, n = kto_torch.fused_linear_logprobs(
            p["kl_hidden"].to(device, dtype), weight.to(device), p["kl_targets"].to(device),
            bias=bias.to(device) if bias is not None else None, **shaping)
    return dict(kl_policy_logp=logp, kl_reference_logp=p["kl_reference_logp"].to(device),
                kl_num_tokens=n)


def logits_of(p, hidden, weight, bias):
    z = hidden @ weight.T
    return z + bias if bias is not None else z


def reference(p, o):
    """Loss, metrics and float64 gradients through materialised float64 logits."""
    h = p["hidden"].double().requires_grad_(True)
    w = p["weight"].double().requires_grad_(True)
    b = p["bias"].double().requires_grad_(True) if p["bias"] is not None else None
    kl_logits = logits_of(p, p["kl_hidden"].double(), w.detach(),
                          b.detach() if b is not None else None)
    kl_logp, kl_n = kto_torch.sequence_logprobs(kl_logits, p["kl_targets"],
                                                average_logprob=o.get("average_logprob", False))
    out = kto_torch.kto_loss(logits_of(p, h, w, b), p["targets"], None,
                             p["reference_logp"].double(), p["desirable"], kl_logp,
                             p["kl_reference_logp"].double(), kl_n, **o)
    out.loss.backward()
    return out, h.grad, w.grad, (b.grad if b is not None else None), kl_logits


def fused(p, o, device="cpu", **kw):
    needs_kl = o.get("reference_point", "kl_batch") == "kl_batch"
    kl = kl_logprobs(p, o, device) if needs_kl else {}
    h = p["hidden"].detach().clone().to(device).requires_grad_(True)
    w = p["weight"].detach().clone().to(device).requires_grad_(True)
    b = p["bias"]
    b = b.detach().clone().to(device).requires_grad_(True) if b is not None else None
    out = kto_torch.fused_linear_kto_loss(
        h, w, p["targets"].to(device), None, p["reference_logp"].to(device),
        p["desirable"].to(device), bias=b, **kl, **o, **kw)
    out.loss.backward()
    return out, h.grad, w.grad, (b.grad if b is not None else None)


def assert_matches(p, o, got, want, u_grad):
    out, dh, dw, db = got
    ref, rh, rw, rb, _ = want
    h64, w64 = p["hidden"].double(), p["weight"].double()
    z = logits_of(p, h64, w64, p["bias"].double() if p["bias"] is not None else None)
    # Σ|ℓ| + |lse| per sequence bounds the log-prob's rounding; the loss follows with β and λ.
    lse = torch.logsumexp(z, -1)
    scored = p["targets"] != -100
    seq_scale = 1 + ((lse.abs() * 2) * scored).sum(-1)
    lam = max(o.get("desirable_weight", 1.0), o.get("undesirable_weight", 1.0), 1.0)
    beta = o.get("beta", 0.1)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * lam * beta * float(seq_scale.max())
    torch.testing.assert_close(out.logp.double().cpu(), ref.logp.double(), rtol=0,
                               atol=1e-5 * float(seq_scale.max()))
    torch.testing.assert_close(out.metrics["kl"].cpu(), ref.metrics["kl"], rtol=0,
                               atol=1e-5 * float(seq_scale.max()))
    # Gradients. rowscale_r = |g_s c_r| (1 + |lse_r| + max|Z_r|) bounds the rounding of
    # ∂L/∂Z[r, :]; carried through one product: (1e-5 + u) Σ_r or Σ_v of rowscale times |W|
    # (dH), |H| (dW) or 1 (db); a result stored in bf16/half adds u_T |value|.
    c = ref.num_tokens.clamp(min=1).double() if o.get("average_logprob") else \
        torch.ones_like(ref.grad_logp.double())
    per_seq = (ref.grad_logp.double().abs() / c)[:, None].expand(scored.shape)
    zmax = z.abs().amax(-1)
    rowscale = (per_seq * (1 + lse.abs() + zmax) * scored).reshape(-1, 1)
    tol = 1e-5 + u_grad
    H = h64.reshape(-1, h64.shape[-1])
    bh = tol * rowscale * w64.abs().sum(0)[None, :]
    bw = tol * (rowscale * H.abs()).sum(0)[None, :].expand_as(w64)
    # Each gradient is stored in its parameter's dtype (an fp32 head under mixed precision
    # gets the fp32 sums: no store roundoff).
    u_hidden, u_head = UNIT_ROUNDOFF[p["hidden"].dtype], UNIT_ROUNDOFF[p["weight"].dtype]
    assert dh.dtype == p["hidden"].dtype and dw.dtype == p["weight"].dtype
    gh, gw, rh = dh.double().cpu().reshape(H.shape), dw.double().cpu(), rh.reshape(H.shape)
    assert bool(((gh - rh).abs() <= bh + u_hidden * rh.abs() + 1e-12).all()), \
        float((gh - rh).abs().max())
    assert bool(((gw - rw).abs() <= bw + u_head * rw.abs() + 1e-12).all()), \
        float((gw - rw).abs().max())
    if rb is not None:
        bb = tol * float(rowscale.sum())
        gb = db.double().cpu()
        assert db.dtype == p["bias"].dtype
        assert bool(((gb - rb).abs() <= bb + u_head * rb.abs() + 1e-12).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["keep_chunk", "recompute"])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_op_matches_float64_reference(dtype, strategy, bias):
    p = make_problem(1, dtype=dtype, bias=bias)
    o = dict(beta=0.3, undesirable_weight=1.3)
    # A 1 KiB budget: chunks of a few rows, so sequences are split and regrouped.
    got = fused(p, o, strategy=strategy, chunk_bytes=1024)
    assert_matches(p, o, got, reference(p, o), 0.0)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("link", ["one_minus_sigmoid", "neg_log_sigmoid"])
@pytest.mark.parametrize("average_logprob", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_op_every_option(loss_type, link, average_logprob, reduction):
    p = make_problem(2)
    o = dict(beta=0.5, desirable_weight=1.7, undesirable_weight=0.6, loss_type=loss_type,
             link=link, average_logprob=average_logprob, reduction=reduction)
    assert_matches(p, o, fused(p, o), reference(p, o), 0.0)


def test_fused_op_equals_logits_level_op_in_float64():
    """Same float64 inputs: the fused op and the logits op agree to rounding."""
    p = make_problem(3, dtype=torch.float64)
    o = dict(beta=0.2)
    out, dh, dw, db = fused(p, o, chunk_bytes=1024)
    ref, rh, rw, rb, _ = reference(p, o)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-12
    torch.testing.assert_close(dh, rh, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(dw, rw, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(db, rb, rtol=1e-10, atol=1e-14)


def test_fused_backward_scales_by_the_incoming_gradient():
    p = make_problem(8, dtype=torch.float64)
    _, dh, dw, db = fused(p, {})
    h, w, b = (p[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias"))
    out = kto_torch.fused_linear_kto_loss(h, w, p["targets"], None, p["reference_logp"],
                                          p["desirable"], bias=b, **kl_logprobs(p))
    (-2.5 * out.loss).backward()
    torch.testing.assert_close(h.grad, -2.5 * dh, rtol=1e-14, atol=0)
    torch.testing.assert_close(w.grad, -2.5 * dw, rtol=1e-14, atol=0)
    torch.testing.assert_close(b.grad, -2.5 * db, rtol=1e-14, atol=0)


def test_fused_logprobs_equal_sequence_logprobs():
    p = make_problem(4, dtype=torch.float64)
    logp, n = kto_torch.fused_linear_logprobs(p["hidden"], p["weight"], p["targets"],
                                              bias=p["bias"])
    want, wn = kto_torch.sequence_logprobs(logits_of(p, p["hidden"], p["weight"], p["bias"]),
                                           p["targets"])
    torch.testing.assert_close(logp, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(n, wn)


def op_args(p, device="cpu"):
    """The inputs of torch.ops.kto.fused_linear_forward for a make_problem() problem."""
    B, T, D = p["hidden"].shape
    offsets = torch.arange(B + 1, dtype=torch.int64) * T
    kl = kl_logprobs(p)
    args = (p["hidden"].reshape(-1, D), p["weight"], p["bias"], p["targets"].reshape(-1), offsets,
            p["reference_logp"], p["desirable"], kl["kl_policy_logp"], kl["kl_reference_logp"],
            kl["kl_num_tokens"], None)
    # The differentiable inputs (hidden, weight, bias) require grad, as in a training step.
    return tuple(None if a is None else a.detach().to(device).requires_grad_(i < 3)
                 for i, a in enumerate(args))


def test_fused_opcheck_and_compile():
    p = make_problem(5)
    args = op_args(p)
    for token_statistics in (False, True):
        options = kto_torch._options(token_statistics=token_statistics)
        torch.library.opcheck(torch.ops.kto.fused_linear_forward.default,
                              args + (options, 1 << 20, 0))
    # The schema's Optional[Tensor]s: no bias, no KL batch (z0 = 0 chosen).
    bare = args[:2] + (None,) + args[3:7] + (None, None, None, None)
    torch.library.opcheck(torch.ops.kto.fused_linear_forward.default,
                          bare + (kto_torch._options(reference_point="zero"), 1 << 20, 0))

    kl = kl_logprobs(p)

    def step(h, w, b):
        return kto_torch.fused_linear_kto_loss(
            h, w, p["targets"], None, p["reference_logp"], p["desirable"], bias=b, **kl).loss

    params = (p["hidden"], p["weight"], p["bias"])
    leaves = [t.detach().clone().requires_grad_(True) for t in params]
    eager = step(*leaves)
    eager.backward()
    again = [t.detach().clone().requires_grad_(True) for t in params]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*again)
    compiled.backward()
    assert torch.equal(eager.detach(), compiled.detach())
    for a, b in zip(leaves, again, strict=True):
        assert torch.equal(a.grad, b.grad)


def test_fused_errors_name_the_argument():
    p = make_problem(6)
    kl = kl_logprobs(p)
    with pytest.raises((ValueError, RuntimeError),
                       match="'weight' must have the dtype of 'hidden'"):
        kto_torch.fused_linear_kto_loss(p["hidden"], p["weight"].double(), p["targets"], None,
                                        p["reference_logp"], p["desirable"], **kl)
    with pytest.raises(kto_torch.KTOError,
                       match=r"kto_torch.fused_linear_kto_loss: argument 'weight' must be the "
                             r"lm_head's weight \[V, D\] with V >= 1 and D = 11 \(the last "
                             r"dimension of 'hidden'\), as nn.Linear\(D, V\).weight holds it; "
                             r"got shape \[41, 12\]$"):
        kto_torch.fused_linear_kto_loss(p["hidden"][..., :-1], p["weight"], p["targets"], None,
                                        p["reference_logp"], p["desirable"], **kl)
    with pytest.raises(ValueError, match="strategy"):
        kto_torch.fused_linear_kto_loss(p["hidden"], p["weight"], p["targets"], None,
                                        p["reference_logp"], p["desirable"], strategy="tiles")
    with pytest.raises(ValueError, match=r"kto_torch.fused_linear_kto_loss: argument 'strategy' "
                                         r"must be 'keep_chunk' or 'recompute' on cpu "
                                         r"\('vocab_blocks' runs on CUDA only\)"):
        kto_torch.fused_linear_kto_loss(p["hidden"], p["weight"], p["targets"], None,
                                        p["reference_logp"], p["desirable"],
                                        strategy="vocab_blocks")
    # The op itself (below the wrapper's check) names the strategy too.
    with pytest.raises((ValueError, RuntimeError), match=r"argument 'strategy' must be keep_chunk "
                                                         r"\(0\) or recompute \(1\) on the CPU "
                                                         r"\(vocab_blocks \(2\) is CUDA only\)"):
        torch.ops.kto.fused_linear_forward(*op_args(p), kto_torch._options(), 1 << 20, 2)
    with pytest.raises(ValueError, match="'hidden' must be"):
        kto_torch.fused_linear_kto_loss(p["hidden"][None], p["weight"], p["targets"], None,
                                        p["reference_logp"], p["desirable"], **kl)
    bad = p["targets"].clone()
    bad[0, 3] = 41
    with pytest.raises(ValueError, match=r"kto_torch.fused_linear_kto_loss: argument "
                                         r"'targets\[0, 3\]' must be in \[0, 41\)"):
        kto_torch.fused_linear_kto_loss(p["hidden"], p["weight"], bad, None, p["reference_logp"],
                                        p["desirable"], **kl)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the CUDA fused op is untested here"))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_mixed_precision_fp32_head_gets_unrounded_fp32_gradients(device, dtype, bias):
    """Half-precision hidden states with an fp32 lm_head (autocast over fp32 parameters,
    TRL's default): the GEMMs read the head in hidden's dtype, and dW, db are the library's
    fp32 sums, never rounded on their way to the fp32 parameters. The head's values are
    representable in hidden's dtype, so the float64 reference of the same values applies:
    dW and db meet the fp32 rule without a store roundoff, the loss equals the all-half
    call's bit for bit, and dW rounded to hidden's dtype is what the all-half call returns."""
    p = make_problem(3, dtype=dtype, bias=bias)
    mixed = dict(p, weight=p["weight"].float(), bias=p["bias"].float() if bias else None)
    o = dict(beta=0.3, undesirable_weight=1.3)
    got = fused(mixed, o, device=device, chunk_bytes=1024)
    half = fused(p, o, device=device, chunk_bytes=1024)
    assert got[2].dtype == torch.float32 and got[1].dtype == dtype
    assert torch.equal(got[0].loss, half[0].loss)
    assert torch.equal(got[1], half[1])
    assert torch.equal(got[2].to(dtype), half[2])
    assert not torch.equal(got[2], half[2].float())  # the fp32 sums carry more bits
    if bias:
        assert got[3].dtype == torch.float32 and torch.equal(got[3].to(dtype), half[3])
    u_grad = UNIT_ROUNDOFF[dtype] if device == "cuda" else 0.0  # dZ rounded on CUDA
    assert_matches(mixed, o, got, reference(mixed, o), u_grad)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: the CUDA fused op is untested here")
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_vocab_blocks_returns_dw_in_the_weight_dtype(bias):
    """vocab_blocks on a GPU: a bf16 weight's dW comes back in bf16 from the library (one
    rounding of each block's fp32 sum), an fp32 weight under mixed precision gets the
    fp32 sums, and the loss is the same (the same forward). Several blocks: a 64 KiB chunk."""
    assert kto_torch._C.has_cuda(), "kto_torch was built without its CUDA kernels"
    p = make_problem(8, dtype=torch.bfloat16, V=5003, bias=bias)
    o = dict(beta=0.2)
    blocks = fused(p, o, device="cuda", strategy="vocab_blocks", chunk_bytes=1 << 16)
    assert_matches(p, o, blocks, reference(p, o), UNIT_ROUNDOFF[torch.bfloat16])
    mixed = dict(p, weight=p["weight"].float(), bias=p["bias"].float() if bias else None)
    got = fused(mixed, o, device="cuda", strategy="vocab_blocks", chunk_bytes=1 << 16)
    assert_matches(mixed, o, got, reference(mixed, o), UNIT_ROUNDOFF[torch.bfloat16])
    assert torch.equal(got[0].loss, blocks[0].loss)
    # The op's own dW output (autograd would cast any dtype to the parameter's): bf16 from
    # the library for the bf16 weight, fp32 for the fp32 one; the fake agrees (opcheck).
    for problem, dtype in ((p, torch.bfloat16), (mixed, torch.float32)):
        call = op_args(problem, "cuda") + (kto_torch._options(), 1 << 16,
                                           kto_torch.STRATEGIES["vocab_blocks"])
        assert torch.ops.kto.fused_linear_forward(*call)[4].dtype == dtype
        torch.library.opcheck(torch.ops.kto.fused_linear_forward.default, call)


def test_mixed_precision_logprobs_equal_the_all_half_call():
    p = make_problem(4, dtype=torch.bfloat16)
    args = (p["hidden"], p["weight"], p["targets"])
    half = kto_torch.fused_linear_logprobs(*args, bias=p["bias"])
    mixed = kto_torch.fused_linear_logprobs(p["hidden"], p["weight"].float(), p["targets"],
                                            bias=p["bias"].float())
    assert torch.equal(half[0], mixed[0]) and torch.equal(half[1], mixed[1])


ZERO = dict(reference_point="zero")  # no KL batch needed


def test_mixed_precision_is_half_hidden_with_an_fp32_head_only():
    p = make_problem(5, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"kto_torch.fused_linear_kto_loss: argument 'weight' "
                                         r"must have the dtype of 'hidden' \(BFloat16\) or be "
                                         r"Float; got Double"):
        fused(dict(p, weight=p["weight"].double(), bias=None), ZERO)
    with pytest.raises(ValueError, match=r"argument 'bias' must have the dtype of 'weight' "
                                         r"\(Float\); got BFloat16"):
        fused(dict(p, weight=p["weight"].float()), ZERO)
    f32 = make_problem(5)
    with pytest.raises(ValueError, match=r"argument 'weight' must have the dtype of 'hidden' "
                                         r"\(Float\); got BFloat16"):
        fused(dict(f32, weight=f32["weight"].bfloat16(), bias=None), ZERO)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: the CUDA fused op is untested here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["keep_chunk", "recompute", "vocab_blocks"])
def test_cuda_fused_op_matches_the_reference(dtype, strategy):
    """On a GPU: cuBLAS GEMMs and kto's kernels through the same op (vocab_blocks: dW
    comes back in the weight's dtype, rounded once; assert_matches' store rule)."""
    assert kto_torch._C.has_cuda(), "kto_torch was built without its CUDA kernels"
    p = make_problem(7, dtype=dtype, V=5003)
    o = dict(beta=0.3)
    u = 0.0 if dtype == torch.float32 else UNIT_ROUNDOFF[dtype]
    assert_matches(p, o, fused(p, o, device="cuda", strategy=strategy), reference(p, o), u)


def test_kept_chunk_buffers_released_and_reused_give_the_same_bits():
    """The CPU fused ops keep their chunk buffers between calls (kto::cpu::release_scratch
    frees them): a call after a release and a call reusing them give the same bits."""
    p = make_problem(6)
    hidden = p["hidden"].to(torch.bfloat16)
    weight = p["weight"].to(torch.bfloat16)

    def logp():
        return kto_torch.fused_linear_logprobs(hidden, weight, p["targets"], chunk_bytes=1 << 16)

    kto_torch.release_scratch()
    first, n = logp()
    again, _ = logp()
    kto_torch.release_scratch()
    fresh, _ = logp()
    assert torch.equal(first, again) and torch.equal(first, fresh)
    assert bool((n > 0).all()) and bool(torch.isfinite(first).all())
    assert isinstance(kto_torch.BF16_GEMM, bool)


def test_fused_backward_hands_over_the_ops_gradients_without_a_copy():
    """loss.backward() (incoming gradient 1): the op's gradients become the parameters'
    .grad themselves when their dtypes match, no second V x D array at the backward's peak;
    a second backward through the graph accumulates (2x). Any other incoming gradient
    scales a copy and leaves the op's outputs as they were."""
    p = make_problem(9)
    args = op_args(p)
    out = torch.ops.kto.fused_linear_forward(*args, kto_torch._options(), 1 << 20, 0)
    dh, dw, db = out[3], out[4], out[5]
    want = (dh.clone(), dw.clone(), db.clone())
    out[0][0].backward(retain_graph=True)
    hidden, weight, bias = args[0], args[1], args[2]
    for grad, op_grad, expected in zip((hidden.grad, weight.grad, bias.grad), (dh, dw, db), want,
                                       strict=True):
        assert grad.data_ptr() == op_grad.data_ptr() and torch.equal(grad, expected)
    out[0][0].backward()  # accumulates into the same tensors
    for grad, expected in zip((hidden.grad, weight.grad, bias.grad), want, strict=True):
        assert torch.equal(grad, 2 * expected)

    args = op_args(p)
    out = torch.ops.kto.fused_linear_forward(*args, kto_torch._options(), 1 << 20, 0)
    want = tuple(t.clone() for t in out[3:6])
    (3 * out[0][0]).backward()
    for arg, op_grad, expected in zip(args[:3], out[3:6], want, strict=True):
        assert arg.grad.data_ptr() != op_grad.data_ptr()
        assert torch.equal(arg.grad, 3 * expected) and torch.equal(op_grad, expected)
