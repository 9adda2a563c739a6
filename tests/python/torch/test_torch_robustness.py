"""kto_torch's argument checks (issue 14, binding side): every tensor argument of every op is
checked for device, dtype, shape and stride before one library call, and strides are passed
literally (stride 0 from expand reads one row repeated).

Each test names the defect it guards (D3, D4, D5, D10, D11, D17); each failed on the binding
of commit 16524c5 (garbage, a silent truncation, a read through a meta/foreign pointer, or an
error that named the wrong thing). CUDA cases skip without a GPU.
"""

import pytest

torch = pytest.importorskip("torch")
kto_torch = pytest.importorskip("kto_torch")

from test_torch import make_batch  # noqa: E402
from test_torch_fused import kl_logprobs, make_problem  # noqa: E402

ERRORS = (ValueError, RuntimeError)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the CUDA checks are untested here")


def loss_and_grad(logits, targets, offsets=None, **kw):
    """kto_loss with fixed per-sequence inputs; (output, grad of the leaf behind logits)."""
    B = offsets.numel() - 1 if offsets is not None else logits.shape[0]
    g = torch.Generator().manual_seed(0)
    args = dict(reference_logp=torch.randn(B, generator=g) - 20,
                desirable=torch.arange(B) % 2 == 0,
                kl_policy_logp=torch.randn(B, generator=g) - 20,
                kl_reference_logp=torch.randn(B, generator=g) - 21,
                kl_num_tokens=torch.full((B,), 3))
    args.update(kw)
    out = kto_torch.kto_loss(logits, targets, offsets, args.pop("reference_logp"),
                             args.pop("desirable"), args.pop("kl_policy_logp"),
                             args.pop("kl_reference_logp"), args.pop("kl_num_tokens"), beta=0.3,
                             **args)
    return out


def assert_same_step(a, b, rtol=1e-6):
    torch.testing.assert_close(a.loss, b.loss, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(a.logp, b.logp, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(a.grad_logp, b.grad_logp, rtol=rtol, atol=1e-9)
    assert torch.equal(a.num_tokens, b.num_tokens)


# ---- D3: strides are literal (expand: stride 0) ----

@pytest.mark.parametrize("shape", ["rows", "batch", "time"])
def test_d3_expanded_logits_equal_the_materialised_copy(shape):
    g = torch.Generator().manual_seed(1)
    V, T, B = 37, 5, 4
    if shape == "rows":  # [1, V] → [B·T, V]: stride(0) = 0 (read as V before: garbage)
        base = (torch.randn(1, V, generator=g) * 3).requires_grad_(True)
        expanded = base.expand(B * T, V)
        offsets = torch.arange(B + 1) * T
        targets = torch.randint(0, V, (B * T,), generator=g)
    elif shape == "batch":  # [1, T, V] → [B, T, V]
        base = (torch.randn(1, T, V, generator=g) * 3).requires_grad_(True)
        expanded, offsets = base.expand(B, T, V), None
        targets = torch.randint(0, V, (B, T), generator=g)
    else:  # [B, 1, V] → [B, T, V]
        base = (torch.randn(B, 1, V, generator=g) * 3).requires_grad_(True)
        expanded, offsets = base.expand(B, T, V), None
        targets = torch.randint(0, V, (B, T), generator=g)
    targets[..., 0] = -100
    assert 0 in expanded.stride()
    copy = expanded.detach().clone().requires_grad_(True)
    got = loss_and_grad(expanded, targets, offsets)
    want = loss_and_grad(copy, targets, offsets)
    assert_same_step(got, want)
    got.loss.backward()
    want.loss.backward()
    reduce_dims = tuple(d for d in range(base.dim()) if base.shape[d] == 1 and copy.shape[d] > 1)
    torch.testing.assert_close(base.grad, copy.grad.sum(reduce_dims, keepdim=True), rtol=1e-5,
                               atol=1e-7)


def test_d3_expanded_targets_equal_the_materialised_copy():
    batch = make_batch(2, B=3, T=4, V=13)
    z = batch["logits"]
    row = torch.tensor([[-100, 3, 7, 12]])
    for targets in (row.expand(3, 4), torch.tensor(5).expand(12)):  # stride 0 over B, over rows
        logits = z if targets.dim() == 2 else z.reshape(12, 13)
        offsets = None if targets.dim() == 2 else torch.tensor([0, 4, 8, 12])
        got = loss_and_grad(logits, targets, offsets)
        want = loss_and_grad(logits, targets.contiguous(), offsets)
        assert_same_step(got, want, rtol=0)
    logp, n = kto_torch.sequence_logprobs(z, row.expand(3, 4))
    want_logp, want_n = kto_torch.sequence_logprobs(z, row.expand(3, 4).contiguous())
    assert torch.equal(logp, want_logp) and torch.equal(n, want_n)


def test_d3_layouts_the_library_cannot_read_are_copied():
    # A transposed [T, B, V] (batch entries interleaved) and a vocabulary stride of 2.
    batch = make_batch(3, B=3, T=5, V=11)
    z, t = batch["logits"], batch["targets"]
    interleaved = z.transpose(0, 1).contiguous().transpose(0, 1)
    strided_v = torch.stack([z, z], -1).reshape(3, 5, 22)[..., ::2]
    want = loss_and_grad(z, t)
    for logits in (interleaved, strided_v):
        assert torch.equal(logits, z)
        assert_same_step(loss_and_grad(logits, t), want, rtol=0)
        assert_same_step(loss_and_grad(logits, t.transpose(0, 1).contiguous().transpose(0, 1)),
                         want, rtol=0)


def test_d3_gradients_are_fresh_contiguous_tensors():
    z = torch.randn(1, 7).requires_grad_(True)
    logits = z.expand(6, 7)
    out = loss_and_grad(logits, torch.tensor([1, 2, -100, 3, 4, 5]), torch.tensor([0, 3, 6]))
    (g,) = torch.autograd.grad(out.loss, logits)
    assert g.is_contiguous() and g.shape == (6, 7) and 0 not in g.stride()
    assert g.data_ptr() != z.data_ptr()


@pytest.mark.parametrize("which", ["hidden", "weight", "both"])
def test_d3_fused_expanded_hidden_and_weight_are_made_contiguous(which):
    """Matrices need rows >= D apart: a stride-0 hidden or weight is copied, not rejected,
    and its gradient reaches the tensor it was expanded from."""
    p = make_problem(4, B=2, T=4, D=6, V=17)
    g = torch.Generator().manual_seed(5)
    h_row = torch.randn(1, 6, generator=g).requires_grad_(True)
    w_row = torch.randn(1, 6, generator=g).requires_grad_(True)
    hidden = h_row.expand(8, 6) if which in ("hidden", "both") else p["hidden"].reshape(8, 6)
    weight = w_row.expand(17, 6) if which in ("weight", "both") else p["weight"]
    offsets = torch.tensor([0, 4, 8])
    targets = p["targets"].reshape(-1)

    def run(h, w):
        return kto_torch.fused_linear_kto_loss(h, w, targets, offsets, p["reference_logp"][:2],
                                               p["desirable"][:2], bias=p["bias"], beta=0.3,
                                               reference_point="zero")

    h_copy = hidden.detach().clone().requires_grad_(True)
    w_copy = weight.detach().clone().requires_grad_(True)
    got, want = run(hidden, weight), run(h_copy, w_copy)
    assert_same_step(got, want)
    got.loss.backward()
    want.loss.backward()
    if which in ("hidden", "both"):
        torch.testing.assert_close(h_row.grad, h_copy.grad.sum(0, keepdim=True), rtol=1e-5,
                                   atol=1e-7)
    if which in ("weight", "both"):
        torch.testing.assert_close(w_row.grad, w_copy.grad.sum(0, keepdim=True), rtol=1e-5,
                                   atol=1e-7)


# ---- D4: the fused op's bias ----

def fused_with_bias(p, bias, fn=kto_torch.fused_linear_kto_loss):
    if fn is kto_torch.fused_linear_logprobs:
        return fn(p["hidden"], p["weight"], p["targets"], bias=bias)
    return fn(p["hidden"], p["weight"], p["targets"], None, p["reference_logp"], p["desirable"],
              bias=bias, **kl_logprobs(p))


@pytest.mark.parametrize("fn", [kto_torch.fused_linear_kto_loss, kto_torch.fused_linear_logprobs])
def test_d4_bias_of_the_wrong_length_raises_naming_it(fn):
    p = make_problem(5, V=41)
    name = fn.__name__
    for bias, got in ((p["bias"][:1], r"\[1\]"), (p["bias"][:-1], r"\[40\]"),
                      (torch.cat([p["bias"], p["bias"][:3]]), r"\[44\]"),
                      (p["bias"][:, None], r"\[41, 1\]")):
        with pytest.raises(ValueError, match=rf"kto_torch.{name}: argument 'bias' must be 1-D "
                                             rf"with V = weight.size\(0\) = 41 entries; "
                                             rf"got shape {got}"):
            fused_with_bias(p, bias, fn)
    with pytest.raises(ValueError, match=r"'bias' must have V = weight.size\(0\) = 41 entries "
                                         r"\(or be None\); got an empty tensor"):
        fused_with_bias(p, p["bias"][:0], fn)


def test_d4_bias_dtype_and_stride():
    p = make_problem(6, V=41)
    with pytest.raises(ValueError, match=r"'bias' must have the dtype of 'weight' \(Float\); got "
                                         r"Double"):
        fused_with_bias(p, p["bias"].double())
    strided = torch.stack([p["bias"], -p["bias"]], 1).reshape(-1)[::2]  # stride 2
    assert strided.stride() == (2,) and torch.equal(strided, p["bias"])
    got, want = fused_with_bias(p, strided), fused_with_bias(p, p["bias"])
    assert_same_step(got, want, rtol=0)
    logp, _ = fused_with_bias(p, strided, kto_torch.fused_linear_logprobs)
    assert torch.equal(logp, fused_with_bias(p, p["bias"], kto_torch.fused_linear_logprobs)[0])


# ---- D5: devices checked against each other ----

def test_d5_meta_tensors_beside_cpu_logits_raise():
    batch = make_batch(7, B=2, T=3, V=5)
    z, t = batch["logits"], batch["targets"]
    ref, d = torch.zeros(2), batch["desirable"]
    for name, kw in (("targets", dict(targets=t.to("meta"))),
                     ("reference_logp", dict(reference_logp=ref.to("meta"))),
                     ("desirable", dict(desirable=d.to("meta"))),
                     ("kl_policy_logp", dict(kl_policy_logp=batch["kl_policy"].to("meta"))),
                     ("global_kl", dict(global_kl=torch.zeros(2, dtype=torch.float64,
                                                              device="meta")))):
        args = dict(targets=t, reference_logp=ref, desirable=d, kl_policy_logp=batch["kl_policy"])
        args.update(kw)
        with pytest.raises(ValueError, match=rf"kto_torch.kto_loss: argument '{name}' must be on "
                                             rf"cpu like 'logits'.*; got meta"):
            kto_torch.kto_loss(z, args["targets"], None, args["reference_logp"],
                               args["desirable"], args["kl_policy_logp"], batch["kl_reference"],
                               batch["kl_num_tokens"], global_kl=args.get("global_kl"))
    with pytest.raises(ValueError, match=r"kto_torch.sequence_logprobs: argument 'offsets' must be "
                                         r"on cpu"):
        kto_torch.sequence_logprobs(z, t, torch.tensor([0, 3, 6], device="meta"))


def test_d5_meta_logits_beside_cpu_targets_raise_and_all_meta_traces():
    batch = make_batch(8, B=2, T=3, V=5)
    z = batch["logits"].to("meta")
    with pytest.raises(ValueError, match=r"argument 'targets' must be on meta like 'logits'; got "
                                         r"cpu"):
        kto_torch.kto_loss(z, batch["targets"], None, torch.zeros(2), batch["desirable"])
    # All on meta (the per-sequence inputs may stay on the CPU): shapes only, no data read.
    out = kto_torch.kto_loss(z, batch["targets"].to("meta"), None, torch.zeros(2),
                             batch["desirable"])
    assert out.loss.device.type == "meta" and out.logp.shape == (2,)


def test_d5_fused_tensors_on_another_device_raise():
    p = make_problem(9, V=41)
    p.update(kl_logprobs(p))
    for name in ("weight", "bias", "targets", "kl_policy_logp", "kl_reference_logp"):
        q = dict(p)
        q[name] = p[name].to("meta")
        # The per-sequence tensors may also be on the CPU.
        or_cpu = r" \(or on the CPU\)" if name.startswith("kl_") else ""
        with pytest.raises(ValueError, match=rf"kto_torch.fused_linear_kto_loss: argument "
                                             rf"'{name}' must be on cpu like 'hidden'{or_cpu}; "
                                             rf"got meta"):
            kto_torch.fused_linear_kto_loss(
                q["hidden"], q["weight"], q["targets"], None, q["reference_logp"],
                q["desirable"], bias=q["bias"], kl_policy_logp=q["kl_policy_logp"],
                kl_reference_logp=q["kl_reference_logp"], kl_num_tokens=q["kl_num_tokens"])
    with pytest.raises(ValueError, match=r"fused_linear_logprobs: argument 'weight' must be on "
                                         r"cpu like 'hidden'; got meta"):
        kto_torch.fused_linear_logprobs(p["hidden"], p["weight"].to("meta"), p["targets"])


@needs_cuda
def test_d5_cuda_and_cpu_mixes_raise():
    batch = make_batch(10, B=2, T=3, V=5)
    z, t = batch["logits"], batch["targets"]
    with pytest.raises(ValueError, match=r"argument 'targets' must be on cpu like 'logits'; got "
                                         r"cuda"):
        kto_torch.kto_loss(z, t.cuda(), None, torch.zeros(2), batch["desirable"])
    with pytest.raises(ValueError, match=r"argument 'reference_logp' must be on cpu"):
        kto_torch.kto_loss(z, t, None, torch.zeros(2, device="cuda"), batch["desirable"])
    if kto_torch._C.has_cuda():
        with pytest.raises(ValueError, match=r"argument 'targets' must be on cuda:0 like 'logits'"):
            kto_torch.kto_loss(z.cuda(), t, None, torch.zeros(2), batch["desirable"])
        # The small per-sequence inputs may stay on the CPU beside CUDA logits.
        out = kto_torch.kto_loss(z.cuda(), t.cuda(), None, torch.zeros(2), batch["desirable"])
        assert out.loss.is_cuda
    p = make_problem(11, V=41)
    with pytest.raises(ValueError, match=r"argument 'weight' must be on cpu like 'hidden'; got "
                                         r"cuda"):
        kto_torch.fused_linear_kto_loss(p["hidden"], p["weight"].cuda(), p["targets"], None,
                                        p["reference_logp"], p["desirable"])


# ---- D10: labels checked in their own dtype ----

@pytest.mark.parametrize("labels, index, shown", [
    (torch.tensor([1, 256, 0, 1]), 1, "256"),
    (torch.tensor([1.0, 0.0, 0.9, 1.0]), 2, "0.9"),
    (torch.tensor([0, 1, 1, -1]), 3, "-1"),
    (torch.tensor([0.0, float("nan"), 1.0, 1.0]), 1, "nan"),
    (torch.tensor([2, 0, 1, 1], dtype=torch.uint8), 0, "2"),
])
def test_d10_desirable_values_other_than_0_and_1_raise(labels, index, shown):
    batch = make_batch(12)
    with pytest.raises(ValueError, match=rf"kto_torch.kto_loss: argument 'desirable\[{index}\]' "
                                         rf"must be 0 \(undesirable\) or 1 \(desirable\), "
                                         rf"or a bool; got {shown}$"):
        loss_and_grad(batch["logits"], batch["targets"], desirable=labels)
    p = make_problem(12)
    with pytest.raises(ValueError,
                       match=rf"fused_linear_kto_loss: argument 'desirable\[{index}\]'"):
        kto_torch.fused_linear_kto_loss(p["hidden"], p["weight"], p["targets"], None,
                                        p["reference_logp"], labels)


def test_d10_integer_and_float_labels_equal_to_0_or_1_are_the_bool_labels():
    batch = make_batch(13)
    want = loss_and_grad(batch["logits"], batch["targets"],
                         desirable=torch.tensor([True, False, False, True]))
    for labels in (torch.tensor([1, 0, 0, 1]), torch.tensor([1.0, 0.0, 0.0, 1.0]),
                   torch.tensor([1, 0, 0, 1], dtype=torch.int32)):
        assert_same_step(loss_and_grad(batch["logits"], batch["targets"], desirable=labels), want,
                         rtol=0)
    with pytest.raises(ValueError, match=r"argument 'desirable' must have 4 entries"):
        loss_and_grad(batch["logits"], batch["targets"], desirable=torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match=r"argument 'desirable' must be 1-D"):
        loss_and_grad(batch["logits"], batch["targets"], desirable=torch.ones(4, 1))


# ---- D11: global_kl of the wrong size raises ----

@pytest.mark.parametrize("n", [0, 1, 3, 4])
def test_d11_global_kl_of_the_wrong_size_raises(n):
    batch = make_batch(14)
    with pytest.raises(ValueError, match=r"kto_torch.kto_loss: argument 'global_kl' must hold the "
                                         r"all-reduced \(S, C\)"):
        loss_and_grad(batch["logits"], batch["targets"],
                      global_kl=torch.ones(n, dtype=torch.float64))


def test_d11_the_op_itself_rejects_a_wrong_size_and_non_finite_values():
    batch = make_batch(15)
    offsets = torch.arange(5) * 6

    def op(global_kl):
        return torch.ops.kto.step_forward(
            batch["logits"], batch["targets"], offsets, torch.zeros(4), batch["desirable"],
            batch["kl_policy"], batch["kl_reference"], batch["kl_num_tokens"], global_kl,
            kto_torch._options())

    for g in (torch.ones(3, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"argument 'global_kl' must hold the all-reduced"):
            op(g)
    with pytest.raises(ValueError, match=r"'global_kl' must hold a finite sum S and a count C >= 0;"
                                         r" got \(nan, 2\)"):
        op(torch.tensor([float("nan"), 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"'global_kl' must be a floating-point tensor"):
        op(torch.tensor([1, 2]))


def test_d11_global_kl_replaces_the_local_kl_batch():
    batch = make_batch(16)
    partial = kto_torch.kl_partial(batch["kl_policy"], batch["kl_reference"],
                                   batch["kl_num_tokens"])
    want = loss_and_grad(batch["logits"], batch["targets"], kl_policy_logp=batch["kl_policy"],
                         kl_reference_logp=batch["kl_reference"],
                         kl_num_tokens=batch["kl_num_tokens"])
    got = loss_and_grad(batch["logits"], batch["targets"], kl_policy_logp=None,
                        kl_reference_logp=None, kl_num_tokens=None, global_kl=partial)
    assert_same_step(got, want, rtol=0)
    assert float(got.metrics["kl"]) == float(want.metrics["kl"])
    # float32 and on the CPU beside any logits.
    got32 = loss_and_grad(batch["logits"], batch["targets"], global_kl=partial.float())
    torch.testing.assert_close(got32.loss, want.loss)


# ---- D17: offsets are integers ----

def test_d17_float_offsets_raise_and_int32_offsets_work():
    batch = make_batch(17, B=2, T=3, V=7)
    z = batch["logits"].reshape(6, 7)
    t = batch["targets"].reshape(6)
    for offsets in (torch.tensor([0.0, 2.7, 6.0]), torch.tensor([0.0, 3.0, 6.0])):
        with pytest.raises(ValueError, match=r"kto_torch.kto_loss: argument 'offsets' must hold "
                                             r"int64 \(or int32\) row offsets; got Float"):
            loss_and_grad(z, t, offsets)
        with pytest.raises(ValueError, match=r"kto_torch.sequence_logprobs: argument 'offsets'"):
            kto_torch.sequence_logprobs(z, t, offsets)
    with pytest.raises(ValueError, match=r"argument 'offsets' must be 1-D with B \+ 1 entries"):
        loss_and_grad(z, t, torch.tensor([[0, 3, 6]]))
    want = loss_and_grad(z, t, torch.tensor([0, 3, 6]))
    assert_same_step(loss_and_grad(z, t, torch.tensor([0, 3, 6], dtype=torch.int32)), want, rtol=0)
    p = make_problem(17)
    with pytest.raises(ValueError, match=r"fused_linear_kto_loss: argument 'offsets' must hold "
                                         r"int64"):
        kto_torch.fused_linear_kto_loss(p["hidden"].reshape(-1, 12), p["weight"], p["targets"],
                                        torch.arange(5.0) * 6, p["reference_logp"],
                                        p["desirable"])
    kl = kl_logprobs(p)
    with pytest.raises(ValueError, match=r"fused_linear_kto_loss: argument 'kl_num_tokens' must be "
                                         r"an integer tensor \(token counts\); got Float"):
        kto_torch.fused_linear_kto_loss(
            p["hidden"], p["weight"], p["targets"], None, p["reference_logp"], p["desirable"],
            **dict(kl, kl_num_tokens=kl["kl_num_tokens"].float()))


# ---- every other tensor: dtype, shape, and the function named ----

def test_other_arguments_are_checked_and_named():
    batch = make_batch(18)
    z, t = batch["logits"], batch["targets"]
    cases = [
        (dict(kl_num_tokens=torch.full((4,), 3.0)), r"'kl_num_tokens' must be an integer tensor"),
        (dict(kl_num_tokens=torch.full((3,), 3)), r"'kl_num_tokens' must have 4 entries"),
        (dict(kl_reference_logp=torch.zeros(3)), r"'kl_reference_logp' must have 4 entries"),
        (dict(reference_logp=torch.zeros(4, dtype=torch.int64)),
         r"'reference_logp' must be a floating-point tensor"),
        (dict(reference_logp=torch.zeros(2, 2)), r"'reference_logp' must be 1-D"),
        (dict(reference_logp=torch.zeros(5)), r"'reference_logp' must have 4 entries"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=r"kto_torch.kto_loss: argument " + message):
            loss_and_grad(z, t, **kw)
    with pytest.raises(ValueError, match=r"'targets' must hold int64 \(or int32\) token ids; got "
                                         r"Float"):
        loss_and_grad(z, t.float())
    with pytest.raises(ValueError, match=r"'targets' must have the shape \[B, T\] = \[4, 6\]"):
        loss_and_grad(z, t.reshape(6, 4))
    with pytest.raises(ValueError, match=r"'logits' must be float32, float64, bfloat16 or float16"):
        loss_and_grad(z.to(torch.int32), t)
    with pytest.raises(ValueError, match=r"'offsets' must be given for logits that are not "
                                         r"\[B, T, V\]"):
        loss_and_grad(z.reshape(24, 29), t.reshape(24))
    assert_same_step(loss_and_grad(z, t.int()), loss_and_grad(z, t), rtol=0)
    with pytest.raises(ValueError, match=r"kto_torch.kl_partial: argument 'kl_num_tokens' must be "
                                         r"an integer tensor"):
        kto_torch.kl_partial(batch["kl_policy"], batch["kl_reference"], torch.ones(4))


def test_library_errors_name_the_python_function_and_argument():
    """The CPU forward is one call of kto::cpu::step_forward (not a re-chained forward); what
    it raises names the Python function and argument, the index in the argument's shape."""
    batch = make_batch(19)
    batch["targets"][1, 2] = 29
    with pytest.raises(ValueError, match=r"^kto_torch.kto_loss: argument 'targets\[1, 2\]' must "
                                         r"be in \[0, 29\)"):
        loss_and_grad(batch["logits"], batch["targets"])
    nan = make_batch(19)
    nan["logits"][0, 1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"^kto_torch.kto_loss: argument 'logits' .*sequence 0, "
                                         r"row 1 \(logits\[0, 1\]\)"):
        loss_and_grad(nan["logits"], nan["targets"].clamp(min=0))


def test_the_ops_options_list_is_checked_and_named():
    """The ops take the options as one list in the library's order (kto_torch.OPTION_NAMES);
    the library checks its length and each value, naming it."""
    batch = make_batch(17)
    offsets = torch.arange(5) * 6
    assert kto_torch.OPTION_NAMES[0] == "beta" and "token_statistics" in kto_torch.OPTION_NAMES

    def op(options):
        return torch.ops.kto.step_forward(
            batch["logits"], batch["targets"], offsets, torch.zeros(4), batch["desirable"],
            batch["kl_policy"], batch["kl_reference"], batch["kl_num_tokens"], None, options)

    good = kto_torch._options()
    op(good)
    n = len(kto_torch.OPTION_NAMES)
    with pytest.raises(ValueError, match=rf"kto_torch.kto_loss: argument 'options' must hold "
                                         rf"kOptionCount = {n} values; got {n - 1}"):
        op(good[:-1])
    bad = list(good)
    bad[kto_torch.OPTION_NAMES.index("loss_type")] = 0.5
    with pytest.raises(ValueError, match=r"kto_torch.kto_loss: argument 'loss_type' must be a "
                                         r"whole number in \[0, 1\]; got 0.5"):
        op(bad)
    with pytest.raises(ValueError, match=r"kto_torch: argument 'link' must be one of"):
        kto_torch._options(link="sigmoid")
