"""Property tests (hypothesis) of kto_torch.kto_loss and kto_torch.fused_linear_kto_loss.

Random small problems — B 1–4 sequences, T 1–6 rows each, V 1–40, D 1–8 — in random layouts
(the shifted view logits[:, :-1], a transposed [T, B, V], an expand with stride 0, strided
slices, packed CSR rows), dtypes (float32, float64, bfloat16), options and ignore_index
patterns (all-ignored sequences included) against the float64 reference of the Python tests
(kto_reference.py).
Tolerance rule (docs/math.md §7, as in test_torch.py): bfloat16 inputs are upcast exactly, so the
reference is that of the upcast values; fp32 accumulation at 1e-5 relative to the magnitude
the quantity comes from; a gradient stored in bfloat16 adds its unit roundoff.

A second family feeds one corruption of a valid problem at a time and requires a
ValueError/RuntimeError, never a crash or a silent result. The whole file runs in well under
a minute (max_examples below, deadline off).
"""

import pytest

torch = pytest.importorskip("torch")
kto_torch = pytest.importorskip("kto_torch")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kto_reference as kr  # noqa: E402
from test_torch import UNIT_ROUNDOFF  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
LAYOUTS = ["contiguous", "shifted", "transposed", "expanded", "strided", "packed"]


# ---- the float64 reference (kto_reference.py) ----

def reference_step(z64, targets, offsets, ref_logp, desirable, kl, o):
    """loss, z0, logp [B], n [B] from float64 logits [rows, V] (autograd flows to z64)."""
    logp, counts = kr.sequence_logprobs(z64, targets, offsets, o.get("average_logprob", False),
                                        o.get("ignore_index", -100))
    z0 = kr.reference_z0(*(kl if kl is not None else (None, None)), o=o)
    return kr.kto_loss(logp, ref_logp, desirable, z0, o).loss, z0, logp, counts


def kl_batch_is_empty(tokens, o) -> bool:
    """z0 estimated from a KL batch with no example to count (the library raises then):
    none at all, or none with a token under the nonempty_mean estimator."""
    if o.get("loss_type", "kto") != "kto" or o.get("reference_point", "kl_batch") != "kl_batch":
        return False
    if o.get("kl_estimator", "mean") == "nonempty_mean":
        return not bool((tokens > 0).any())
    return tokens.numel() == 0


# An empty KL batch under nonempty_mean (no sequence with a token), or an all-reduced one.
EMPTY_KL = r"argument '(kl_num_tokens|global_kl)' must count at least one KL"


# ---- strategies ----

@st.composite
def options(draw):
    o = dict(beta=draw(st.sampled_from([0.05, 0.3, 1.0])),
             desirable_weight=draw(st.sampled_from([1.0, 1.5])),
             undesirable_weight=draw(st.sampled_from([1.0, 0.7, 1.33])),
             loss_type=draw(st.sampled_from(["kto", "apo_zero_unpaired"])),
             link=draw(st.sampled_from(["one_minus_sigmoid", "neg_log_sigmoid"])),
             kl_estimator=draw(st.sampled_from(["mean", "nonempty_mean"])),
             clamp_kl=draw(st.booleans()),
             average_logprob=draw(st.booleans()),
             reduction=draw(st.sampled_from(["mean", "sum"])),
             ignore_index=draw(st.sampled_from([-100, -1])))
    point = draw(st.sampled_from(["kl_batch", "kl_batch", "fixed", "zero"]))
    o["reference_point"] = point
    if point == "fixed":
        o["fixed_z0"] = draw(st.sampled_from([-0.5, 0.0, 0.7]))
    return o


@st.composite
def sequence_problem(draw, max_v=40):
    """Target ids per sequence, with ignored rows and whole ignored sequences."""
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 6))
    V = draw(st.integers(1, max_v))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    pattern = draw(st.sampled_from(["random", "prompt", "none_ignored", "all_ignored_one"]))
    targets = torch.randint(0, V, (B, T), generator=g)
    if pattern == "random":
        mask = torch.rand(B, T, generator=g) < 0.3
    elif pattern == "prompt":
        mask = torch.arange(T)[None, :].expand(B, T) < min(2, T - 1)
    else:
        mask = torch.zeros(B, T, dtype=torch.bool)
    if pattern == "all_ignored_one" or (B > 1 and draw(st.booleans())):
        mask = mask.clone()
        mask[draw(st.integers(0, B - 1))] = True  # an all-ignored sequence
    return dict(B=B, T=T, V=V, g=g, targets=targets, mask=mask)


def per_sequence_inputs(g, B, dtype=torch.float32):
    K = B
    kl_tokens = torch.randint(0, 4, (K,), generator=g)
    kl_policy = torch.randn(K, generator=g) * 2 - 10
    kl_reference = kl_policy - 0.3 + 0.5 * torch.randn(K, generator=g)
    return dict(reference_logp=(torch.randn(B, generator=g) * 2 - 8).to(dtype),
                desirable=torch.rand(B, generator=g) < 0.5,
                kl=(kl_policy, kl_reference, kl_tokens))


def lay_out(values, layout, g):
    """`values` [B, T, V] as a tensor of the given layout with the same elements (a view where
    the layout is one), plus how to flatten it to rows and the CSR offsets."""
    B, T, V = values.shape
    if layout == "shifted":
        full = torch.cat([values, torch.randn(B, 1, V, generator=g).to(values.dtype)], 1)
        return full[:, :-1]
    if layout == "transposed":
        return values.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "expanded":  # every sequence the same logits: stride 0 over the batch
        return values[:1].expand(B, T, V)
    if layout == "strided":
        wide = torch.randn(B, 2 * T, V + 3, generator=g).to(values.dtype)
        wide[:, ::2, :V] = values
        return wide[:, ::2, :V]
    return values


def make_logits(p, layout, dtype):
    B, T, V, g = p["B"], p["T"], p["V"], p["g"]
    values = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    if layout == "expanded":
        values = values[:1].expand(B, T, V).contiguous()
    logits = lay_out(values, layout, g)
    assert torch.equal(logits, values)
    return logits


# ---- kto_loss ----

@settings(max_examples=300, **SETTINGS)
@given(p=sequence_problem(), dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       o=options(), global_kl=st.booleans())
def test_kto_loss_matches_the_float64_reference(p, dtype, layout, o, global_kl):
    B, T, V, g = p["B"], p["T"], p["V"], p["g"]
    targets = torch.where(p["mask"], torch.tensor(o["ignore_index"]), p["targets"])
    logits = make_logits(p, layout, dtype)
    offsets = None
    if layout == "packed":  # [rows, V] with CSR offsets of random lengths (some empty)
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        rows = int(offsets[-1])
        logits = (torch.randn(rows, V, generator=g) * 3).to(dtype)
        targets = torch.randint(0, V, (rows,), generator=g)
        targets[torch.rand(rows, generator=g) < 0.3] = o["ignore_index"]
    if layout == "transposed" and draw_targets_transposed(g):
        targets = targets.transpose(0, 1).contiguous().transpose(0, 1)
    inputs = per_sequence_inputs(g, B)
    kl = inputs["kl"]
    kwargs = dict(o)
    if global_kl:
        partial = kto_torch.kl_partial(*kl, kl_estimator=o["kl_estimator"])
        kl_args, kwargs["global_kl"] = (None, None, None), partial
    else:
        kl_args = kl

    view = logits.detach().requires_grad_(True)  # same strides: a leaf view
    if kl_batch_is_empty(kl[2], o):
        with pytest.raises(ValueError, match=EMPTY_KL):
            kto_torch.kto_loss(view, targets, offsets, inputs["reference_logp"],
                               inputs["desirable"], *kl_args, **kwargs)
        return
    out = kto_torch.kto_loss(view, targets, offsets, inputs["reference_logp"],
                             inputs["desirable"], *kl_args, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, view)

    flat_offsets = offsets if offsets is not None else torch.arange(B + 1) * T
    z64 = view.detach().double().reshape(-1, V).requires_grad_(True)
    want, z0, logp, counts = reference_step(z64, targets.reshape(-1), flat_offsets,
                                            inputs["reference_logp"], inputs["desirable"], kl, o)
    (want_grad,) = torch.autograd.grad(want, z64)

    longest = int((flat_offsets[1:] - flat_offsets[:-1]).max()) if B else 1
    scale = 1.0 + float(z64.detach().abs().max()) * max(longest, 1) if z64.numel() else 1.0
    beta_l = o["beta"] * max(o["desirable_weight"], o["undesirable_weight"])
    assert abs(out.loss.item() - want.item()) <= 1e-5 * scale * max(beta_l, 1.0), \
        (out.loss.item(), want.item())
    assert abs(float(out.metrics["kl"]) - z0) <= 1e-5 * max(1.0, abs(z0))
    torch.testing.assert_close(out.logp.double(), logp.detach(), rtol=0, atol=1e-5 * scale)
    assert torch.equal(out.num_tokens, counts)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    if want_grad.numel() == 0:
        return
    got = grad.double().reshape(-1, V)
    bound = 1e-4 * (float(want_grad.abs().max()) + 1e-30) + UNIT_ROUNDOFF[dtype] * want_grad.abs()
    assert bool(((got - want_grad).abs() <= bound).all()), float((got - want_grad).abs().max())
    assert bool((got[targets.reshape(-1) == o["ignore_index"]] == 0).all())


def draw_targets_transposed(g):
    return bool(torch.rand(1, generator=g) < 0.5)


# ---- fused_linear_kto_loss ----

def matrix_layout(x, layout, g):
    """The same [rows, D] values as a transposed-storage view, a strided slice or (rows all
    equal) an expand; the op copies what the library cannot read in place."""
    if layout == "transposed":
        return x.t().contiguous().t()
    if layout == "strided":
        wide = torch.randn(x.shape[0], 2 * x.shape[1] + 1, generator=g).to(x.dtype)
        wide[:, 1:x.shape[1] + 1] = x
        return wide[:, 1:x.shape[1] + 1]
    if layout == "expanded":
        return x[:1].expand_as(x)
    return x


@settings(max_examples=200, **SETTINGS)
@given(p=sequence_problem(), D=st.integers(1, 8), dtype=st.sampled_from(DTYPES),
       h_layout=st.sampled_from(["contiguous", "transposed", "strided", "expanded"]),
       w_layout=st.sampled_from(["contiguous", "transposed", "strided", "expanded"]),
       bias=st.booleans(), kl_batch=st.booleans(), o=options(),
       strategy=st.sampled_from(["keep_chunk", "recompute"]),
       chunk_bytes=st.sampled_from([64, 1024, 1 << 20]), fp32_head=st.booleans())
def test_fused_linear_kto_loss_matches_the_float64_reference(p, D, dtype, h_layout, w_layout,
                                                             bias, kl_batch, o, strategy,
                                                             chunk_bytes, fp32_head):
    """fp32_head (with bfloat16 hidden states): the lm_head is fp32 holding bf16 values
    (mixed precision), so the same reference applies and its gradients store no roundoff."""
    B, T, V, g = p["B"], p["T"], p["V"], p["g"]
    N = B * T
    targets = torch.where(p["mask"], torch.tensor(o["ignore_index"]), p["targets"]).reshape(-1)
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 2 / D**0.5).to(dtype)
    if h_layout == "expanded":
        h = h[:1].expand(N, D).contiguous()
    if w_layout == "expanded":
        w = w[:1].expand(V, D).contiguous()
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    mixed = fp32_head and dtype == torch.bfloat16
    if mixed:
        w = w.float()
        b = b.float() if b is not None else None
    offsets = torch.arange(B + 1) * T
    inputs = per_sequence_inputs(g, B)
    kw = dict(o)
    kl = (None, None, None)
    if kl_batch:
        kl_h = torch.randn(N, D, generator=g).to(dtype)
        kl_t = torch.randint(0, V, (N,), generator=g)
        kl_t[torch.rand(N, generator=g) < 0.3] = o["ignore_index"]
        kl_ref = torch.randn(B, generator=g) * 2 - 8
        with torch.no_grad():  # the KL batch as the loss takes it: its log-probs
            kl_logp, kl_n = kto_torch.fused_linear_logprobs(
                kl_h, w, kl_t, offsets, bias=b, average_logprob=o["average_logprob"],
                ignore_index=o["ignore_index"])
        kw.update(kl_policy_logp=kl_logp, kl_reference_logp=kl_ref, kl_num_tokens=kl_n)
    elif o["reference_point"] == "kl_batch":
        kw["reference_point"] = "zero"  # no KL batch: z0 = 0 stated explicitly
    o_ref = dict(o, reference_point=kw.get("reference_point", o["reference_point"]))

    if kl_batch and kl_batch_is_empty((kl_t.reshape(B, T) != o["ignore_index"]).sum(1), o):
        with pytest.raises(ValueError, match=EMPTY_KL):
            kto_torch.fused_linear_kto_loss(h, w, targets, offsets, inputs["reference_logp"],
                                            inputs["desirable"], bias=b, **kw)
        return
    h_leaf = h.detach().requires_grad_(True)
    w_leaf = w.detach().requires_grad_(True)
    b_leaf = b.detach().requires_grad_(True) if b is not None else None
    out = kto_torch.fused_linear_kto_loss(
        matrix_layout(h_leaf, h_layout, g), matrix_layout(w_leaf, w_layout, g), targets, offsets,
        inputs["reference_logp"], inputs["desirable"], bias=b_leaf, strategy=strategy,
        chunk_bytes=chunk_bytes, **kw)
    out.loss.backward()

    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    b64 = b.double().requires_grad_(True) if b is not None else None
    z = h64 @ w64.T + (b64 if b64 is not None else 0)
    if kl_batch:
        with torch.no_grad():
            kz = kl_h.double() @ w64.T + (b64 if b64 is not None else 0)
            _, _, kl_logp, kl_n = reference_step(kz, kl_t, offsets, torch.zeros(B),
                                                 torch.ones(B, dtype=torch.bool), None,
                                                 dict(o, reference_point="zero"))
        kl = (kl_logp, kl_ref, kl_n)
    want, z0, logp, counts = reference_step(z, targets, offsets, inputs["reference_logp"],
                                            inputs["desirable"], kl, o_ref)
    want.backward()

    zmax = float(z.detach().abs().max())
    scale = 1.0 + (zmax + float(torch.logsumexp(z.detach(), -1).abs().max())) * T
    beta_l = o["beta"] * max(o["desirable_weight"], o["undesirable_weight"])
    assert abs(out.loss.item() - want.item()) <= 1e-5 * scale * max(beta_l, 1.0)
    assert abs(float(out.metrics["kl"]) - z0) <= 1e-5 * scale
    torch.testing.assert_close(out.logp.double(), logp.detach(), rtol=0, atol=1e-5 * scale)
    assert torch.equal(out.num_tokens, counts)
    # Gradients (test_torch_fused's rule): rowscale_r = |g_s c_r| (1 + |lse_r| + max|Z_r|)
    # bounds the fp32 rounding of dL/dZ[r, :]; carried through one product over V (dH) or the
    # rows (dW, db); a bf16 result adds its unit roundoff.
    logp_leaf = logp.detach().requires_grad_(True)
    g_s = torch.autograd.grad(kr.kto_loss(logp_leaf, inputs["reference_logp"],
                                          inputs["desirable"], z0, o_ref).loss,
                              logp_leaf)[0].abs()
    c = 1.0 / counts.clamp(min=1).double() if o["average_logprob"] else \
        torch.ones(B, dtype=torch.float64)
    seq_of_row = torch.arange(N) // T
    scored = targets != o["ignore_index"]
    lse = torch.logsumexp(z.detach(), -1)
    rowscale = ((g_s * c)[seq_of_row] * (1 + lse.abs() + z.detach().abs().amax(-1)) * scored)
    row = rowscale[:, None].expand(N, V)
    u_head = UNIT_ROUNDOFF[w.dtype]
    for got, ref, bound, layout, stored_dtype in (
            (h_leaf.grad, h64.grad, row @ w64.detach().abs(), h_layout, dtype),
            (w_leaf.grad, w64.grad, row.T @ h64.detach().abs(), w_layout, w.dtype)):
        assert got.dtype == stored_dtype
        stored = UNIT_ROUNDOFF[stored_dtype] * ref.abs()
        if layout == "expanded":
            # The op saw row 0 repeated: autograd sums its rows' gradients, each stored in the
            # parameter's dtype, then rounds the sum once more.
            def first_row(x):
                return torch.cat([x.sum(0, keepdim=True), torch.zeros_like(x[1:])])
            ref, bound, stored = first_row(ref), first_row(bound), 2 * first_row(stored)
        err = (got.double() - ref).abs()
        assert bool((err <= 1e-5 * bound + stored + 1e-12).all()), float(err.max())
    if b is not None:
        err = (b_leaf.grad.double() - b64.grad).abs()
        assert bool((err <= 1e-5 * row.sum(0) + u_head * b64.grad.abs() + 1e-12).all())


# ---- invalid inputs raise, never crash ----

CORRUPTIONS = ["target_too_large", "target_negative", "nan_logit", "inf_logit",
               "offsets_decreasing", "offsets_past_rows", "offsets_float", "desirable_2",
               "desirable_fraction", "reference_nan", "reference_short", "global_kl_3",
               "logits_int", "targets_float", "targets_short", "kl_short", "kl_tokens_float",
               "beta_negative", "weight_negative", "meta_targets", "logits_1d"]


@settings(max_examples=300, **SETTINGS)
@given(p=sequence_problem(max_v=12), corruption=st.sampled_from(CORRUPTIONS),
       dtype=st.sampled_from(DTYPES), which=st.integers(0, 1000))
def test_invalid_inputs_raise_a_value_or_runtime_error(p, corruption, dtype, which):
    B, T, V, g = p["B"], p["T"], p["V"], p["g"]
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    targets = torch.where(p["mask"], torch.tensor(-100), p["targets"])
    scored = (targets != -100).nonzero()
    if scored.numel() == 0:  # keep one scored row so that a bad logit or id is read
        targets[0, 0] = 0
        scored = (targets != -100).nonzero()
    sb, st_ = (int(x) for x in scored[which % scored.shape[0]])
    inputs = per_sequence_inputs(g, B)
    ref, desirable = inputs["reference_logp"], inputs["desirable"]
    kl_p, kl_r, kl_n = inputs["kl"]
    offsets = torch.arange(B + 1) * T
    kw = {}
    if corruption == "target_too_large":
        targets[sb, st_] = V
    elif corruption == "target_negative":
        targets[sb, st_] = -2
    elif corruption == "nan_logit":
        logits[sb, st_, which % V] = float("nan")
    elif corruption == "inf_logit":
        logits[sb, st_, which % V] = float("inf")
    elif corruption == "offsets_decreasing":
        offsets = offsets.clone()
        offsets[1] = offsets[0] - 1
    elif corruption == "offsets_past_rows":
        offsets = offsets.clone()
        offsets[-1] = B * T + 1
    elif corruption == "offsets_float":
        offsets = offsets.float()
    elif corruption == "desirable_2":
        desirable = desirable.long()
        desirable[which % B] = 2
    elif corruption == "desirable_fraction":
        desirable = desirable.float()
        desirable[which % B] = 0.5
    elif corruption == "reference_nan":
        ref = ref.clone()
        ref[which % B] = float("nan")
    elif corruption == "reference_short":
        ref = ref[:-1]
    elif corruption == "global_kl_3":
        kw["global_kl"] = torch.zeros(3, dtype=torch.float64)
    elif corruption == "logits_int":
        logits = logits.to(torch.int64)
    elif corruption == "targets_float":
        targets = targets.double()
    elif corruption == "targets_short":
        targets = targets[:, :-1] if T > 1 else targets[:0]
    elif corruption == "kl_short":
        kl_r = kl_r[:-1]
    elif corruption == "kl_tokens_float":
        kl_n = kl_n.float()
    elif corruption == "beta_negative":
        kw["beta"] = -0.1
    elif corruption == "weight_negative":
        kw["undesirable_weight"] = -1.0
    elif corruption == "meta_targets":
        targets = targets.to("meta")
    elif corruption == "logits_1d":
        logits = logits.reshape(-1)
    with pytest.raises((ValueError, RuntimeError)):
        kto_torch.kto_loss(logits, targets, offsets if logits.dim() == 3 else None, ref,
                           desirable, kl_p, kl_r, kl_n, **kw)


FUSED_CORRUPTIONS = ["bias_short", "bias_long", "bias_dtype", "weight_dtype", "weight_cols",
                     "hidden_nan", "target_too_large", "offsets_float", "kl_logp_nan",
                     "kl_reference_short", "meta_weight", "desirable_2", "chunk_bytes_0"]


@settings(max_examples=150, **SETTINGS)
@given(p=sequence_problem(max_v=12), D=st.integers(1, 6),
       corruption=st.sampled_from(FUSED_CORRUPTIONS), which=st.integers(0, 1000))
def test_invalid_fused_inputs_raise_a_value_or_runtime_error(p, D, corruption, which):
    B, T, V, g = p["B"], p["T"], p["V"], p["g"]
    N = B * T
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g)
    bias = torch.randn(V, generator=g)
    targets = torch.where(p["mask"], torch.tensor(-100), p["targets"]).reshape(-1)
    if bool((targets == -100).all()):
        targets[0] = 0
    r = int((targets != -100).nonzero()[which % int((targets != -100).sum())])
    inputs = per_sequence_inputs(g, B)
    desirable = inputs["desirable"]
    offsets = torch.arange(B + 1) * T
    kl_logp, kl_reference = torch.randn(B, generator=g) - 8, torch.randn(B, generator=g) - 8
    kw = dict(chunk_bytes=1024)
    if corruption == "bias_short":
        bias = bias[:-1] if V > 1 else bias[:0]
    elif corruption == "bias_long":
        bias = torch.cat([bias, bias])
    elif corruption == "bias_dtype":
        bias = bias.double()
    elif corruption == "weight_dtype":
        weight = weight.bfloat16()
    elif corruption == "weight_cols":
        weight = torch.randn(V, D + 1, generator=g)
    elif corruption == "hidden_nan":
        hidden[r, which % D] = float("nan")
    elif corruption == "target_too_large":
        targets[r] = V + which % 3
    elif corruption == "offsets_float":
        offsets = offsets.double()
    elif corruption == "kl_logp_nan":
        kl_logp[which % B] = float("nan")
    elif corruption == "kl_reference_short":
        kl_reference = kl_reference[:-1]
    elif corruption == "meta_weight":
        weight = weight.to("meta")
    elif corruption == "desirable_2":
        desirable = desirable.long()
        desirable[which % B] = 2
    elif corruption == "chunk_bytes_0":
        kw["chunk_bytes"] = 0
    with pytest.raises((ValueError, RuntimeError)):
        kto_torch.fused_linear_kto_loss(hidden, weight, targets, offsets,
                                        inputs["reference_logp"], desirable, bias=bias,
                                        kl_policy_logp=kl_logp, kl_reference_logp=kl_reference,
                                        **kw)
