"""kto_torch ops against a float64 PyTorch reference written for the test (CPU).

Tolerance rule (docs/math.md §7): fp32 accumulation vs the float64 reference of the
same upcast inputs at 1e-5 relative to the magnitude the quantity comes from;
gradients stored in bfloat16/float16 add that type's unit roundoff relative to
the value (2^-8, 2^-11).
"""

import os
import tempfile

import pytest

torch = pytest.importorskip("torch")
kto_torch = pytest.importorskip("kto_torch")

import kto_reference as kr  # noqa: E402  (the float64 reference of the Python tests)

UNIT_ROUNDOFF = {d: kr.unit_roundoff(d)
                 for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def make_batch(seed, B=4, T=6, V=29, dtype=torch.float32, shifted=False):
    g = torch.Generator().manual_seed(seed)
    if shifted:  # a [B, T+1, V] tensor seen as logits[:, :-1] with labels[:, 1:]
        full = (torch.randn(B, T + 1, V, generator=g) * 3).to(dtype)
        labels = torch.randint(0, V, (B, T + 1), generator=g)
        labels[:, :2] = -100  # the prompt
        logits, targets = full[:, :-1], labels[:, 1:]
    else:
        logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
        targets = torch.randint(0, V, (B, T), generator=g)
        targets[torch.rand(B, T, generator=g) < 0.2] = -100
    if B > 2:
        targets[2] = -100  # an all-ignored sequence
    desirable = torch.rand(B, generator=g) < 0.5
    K = B
    kl_num_tokens = torch.randint(0, T, (K,), generator=g)
    kl_policy = torch.where(kl_num_tokens > 0, torch.randn(K, generator=g) * 4 - 20, torch.zeros(K))
    kl_reference = torch.where(kl_num_tokens > 0,
                               kl_policy - 0.4 + 0.5 * torch.randn(K, generator=g),
                               torch.zeros(K))
    return dict(logits=logits, targets=targets, desirable=desirable, kl_policy=kl_policy,
                kl_reference=kl_reference, kl_num_tokens=kl_num_tokens, generator=g)


def reference_loss(logits64, batch, ref_logp, o):
    """(loss, z0, ρ, logp) of kto_reference's float64 KTO step (autograd flows to logits64)."""
    logp, _ = kr.sequence_logprobs(logits64, batch["targets"],
                                   average=o.get("average_logprob", False))
    z0 = kr.reference_z0(batch["kl_policy"], batch["kl_reference"], batch["kl_num_tokens"], o)
    step = kr.kto_loss(logp, ref_logp, batch["desirable"], z0, o)
    return step.loss, z0, step.rho, logp


def run_ours(batch, ref_logp, o, logits=None):
    logits = batch["logits"] if logits is None else logits
    z = logits.detach().clone().requires_grad_(True) if logits.is_leaf else logits
    out = kto_torch.kto_loss(z, batch["targets"], None, ref_logp, batch["desirable"],
                             batch["kl_policy"], batch["kl_reference"], batch["kl_num_tokens"], **o)
    out.loss.backward()
    return out, z.grad


def check(batch, o):
    logits = batch["logits"]
    logits64 = logits.double().requires_grad_(True)
    average = o.get("average_logprob", False)
    ref_logp = (kr.sequence_logprobs(logits64.detach(), batch["targets"], average=average)[0]
                + 0.5 * torch.randn(logits.shape[0], generator=batch["generator"],
                                    dtype=torch.float64)).float()
    want, z0, rho, logp = reference_loss(logits64, batch, ref_logp, o)
    want.backward()
    leaf = logits.detach().clone().requires_grad_(True)
    out = kto_torch.kto_loss(leaf, batch["targets"], None, ref_logp, batch["desirable"],
                             batch["kl_policy"], batch["kl_reference"], batch["kl_num_tokens"], **o)
    out.loss.backward()
    scale = 1.0 + float(logits64.detach().abs().max()) * logits.shape[1]
    assert abs(out.loss.item() - want.item()) <= 1e-5 * scale
    assert abs(float(out.metrics["kl"]) - z0) <= 1e-5 * max(1.0, abs(z0))
    torch.testing.assert_close(out.logp.double(), logp.detach(), rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(out.ratio.double(), rho.detach(), rtol=0, atol=1e-5 * scale)
    g, w = leaf.grad.double(), logits64.grad
    assert leaf.grad.dtype == logits.dtype
    gmax = float(w.abs().max()) + 1e-30
    bound = 1e-4 * gmax + UNIT_ROUNDOFF[logits.dtype] * w.abs()
    assert bool(((g - w).abs() <= bound).all()), float((g - w).abs().max())
    assert bool((g[batch["targets"] == -100] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kto_loss_matches_reference_for_every_dtype(dtype):
    check(make_batch(1, dtype=dtype), dict(beta=0.3, undesirable_weight=1.33))


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("link", ["one_minus_sigmoid", "neg_log_sigmoid"])
@pytest.mark.parametrize("kl_estimator", ["mean", "nonempty_mean"])
@pytest.mark.parametrize("average_logprob", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_option_matches_reference(loss_type, link, kl_estimator, average_logprob, reduction):
    check(make_batch(2), dict(beta=0.6, desirable_weight=1.5, undesirable_weight=0.7,
                              loss_type=loss_type, link=link, kl_estimator=kl_estimator,
                              average_logprob=average_logprob, reduction=reduction))


def test_shifted_view_needs_no_copy():
    batch = make_batch(3, shifted=True)
    assert not batch["logits"].is_contiguous() and not batch["targets"].is_contiguous()
    check(batch, dict(beta=0.2))


def test_sequence_logprobs_matches_reference():
    batch = make_batch(4, dtype=torch.bfloat16)
    logp, n = kto_torch.sequence_logprobs(batch["logits"], batch["targets"])
    want, want_n = kr.sequence_logprobs(batch["logits"].double(), batch["targets"])
    torch.testing.assert_close(logp.double(), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(n, want_n)


def test_opcheck_schemas_fake_kernels_and_autograd():
    batch = make_batch(5)
    offsets = torch.arange(5, dtype=torch.int64) * 6
    args = (batch["logits"].requires_grad_(True), batch["targets"], offsets,
            torch.full((4,), -20.0), batch["desirable"], batch["kl_policy"], batch["kl_reference"],
            batch["kl_num_tokens"], None)
    for token_statistics in (False, True):
        options = kto_torch._options(token_statistics=token_statistics)
        torch.library.opcheck(torch.ops.kto.step_forward.default, args + (options,))
    # The schema's Optional[Tensor]s: no KL batch at all (z0 = 0 chosen), or an all-reduced one.
    bare = args[:5] + (None, None, None, None)
    torch.library.opcheck(torch.ops.kto.step_forward.default,
                          bare + (kto_torch._options(reference_point="zero"),))
    global_kl = torch.tensor([0.5, 3.0], dtype=torch.float64)
    torch.library.opcheck(torch.ops.kto.step_forward.default,
                          args[:5] + (None, None, None, global_kl, kto_torch._options()))
    torch.library.opcheck(torch.ops.kto.sequence_logprobs.default,
                          (batch["logits"].detach(), batch["targets"], offsets,
                           kto_torch._options()))


def test_torch_compile_traces_without_graph_breaks():
    batch = make_batch(6)
    ref = torch.full((4,), -20.0)

    def step(z):
        out = kto_torch.kto_loss(z, batch["targets"], None, ref, batch["desirable"],
                                 batch["kl_policy"], batch["kl_reference"], batch["kl_num_tokens"],
                                 beta=0.1)
        return out.loss

    z1 = batch["logits"].detach().clone().requires_grad_(True)
    z2 = batch["logits"].detach().clone().requires_grad_(True)
    eager = step(z1)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(z2)
    compiled.backward()
    assert torch.equal(eager.detach(), compiled.detach())
    assert torch.equal(z1.grad, z2.grad)


def test_errors_surface_with_the_library_message():
    batch = make_batch(7)
    batch["targets"][0, 1] = 10_000
    with pytest.raises(ValueError, match=r"targets\[0, 1\]' must be in \[0, 29\)"):
        run_ours(batch, torch.zeros(4), {})
    with pytest.raises(ValueError, match="kto_torch.kto_loss: argument 'loss_type'"):
        run_ours(make_batch(7), torch.zeros(4), dict(loss_type="dpo"))
    with pytest.raises(ValueError, match="kto_torch.kto_loss: argument 'beta' must be finite, > 0"):
        run_ours(make_batch(7), torch.zeros(4), dict(beta=-1.0))


def _rank_main(rank, world, init_file, batch, ref_logp, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    per = batch["logits"].shape[0] // world
    sl = slice(rank * per, (rank + 1) * per)
    partial = kto_torch.kl_partial(batch["kl_policy"][sl], batch["kl_reference"][sl],
                                   batch["kl_num_tokens"][sl])
    dist.all_reduce(partial)  # the one collective: (S, C)
    z = batch["logits"][sl].detach().clone().requires_grad_(True)
    out = kto_torch.kto_loss(z, batch["targets"][sl], None, ref_logp[sl], batch["desirable"][sl],
                             global_kl=partial, mean_denominator=batch["logits"].shape[0])
    out.loss.backward()
    torch.save({"loss": out.loss.detach(), "kl": out.metrics["kl"], "grad": z.grad},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_data_parallel_gloo_two_ranks_equal_one_process():
    import torch.multiprocessing as mp

    batch = make_batch(8, B=4, dtype=torch.float64)
    batch.pop("generator")
    ref_logp = torch.full((4,), -40.0, dtype=torch.float64)
    z = batch["logits"].detach().clone().requires_grad_(True)
    single = kto_torch.kto_loss(z, batch["targets"], None, ref_logp, batch["desirable"],
                                batch["kl_policy"], batch["kl_reference"], batch["kl_num_tokens"])
    single.loss.backward()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(2, os.path.join(tmp, "init"), batch, ref_logp, tmp), nprocs=2)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    assert abs(sum(float(r["loss"]) for r in ranks) - single.loss.item()) <= 1e-12
    for r in ranks:
        assert abs(float(r["kl"]) - float(single.metrics["kl"])) <= 1e-14
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), z.grad, rtol=1e-12, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: the CUDA op is untested here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shifted", [False, True])
def test_cuda_op_matches_the_reference(dtype, shifted):
    """On a GPU: the CUDA kernels through the same op, against the float64 reference."""
    assert kto_torch._C.has_cuda(), "kto_torch was built without its CUDA kernels"
    batch = make_batch(11, dtype=dtype, shifted=shifted)
    cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    cuda["generator"] = batch["generator"]
    logits64 = batch["logits"].double().requires_grad_(True)
    ref_logp = kr.sequence_logprobs(logits64.detach(), batch["targets"])[0].float() - 0.3
    want, z0, rho, logp = reference_loss(logits64, batch, ref_logp, {"beta": 0.2})
    want.backward()
    z = cuda["logits"].detach().clone().requires_grad_(True)
    out = kto_torch.kto_loss(z, cuda["targets"], None, ref_logp.cuda(), cuda["desirable"],
                             cuda["kl_policy"], cuda["kl_reference"], cuda["kl_num_tokens"],
                             beta=0.2)
    out.loss.backward()
    scale = 1.0 + float(logits64.detach().abs().max()) * batch["logits"].shape[1]
    assert abs(out.loss.item() - want.item()) <= 1e-5 * scale
    assert abs(out.metrics["kl"].item() - z0) <= 1e-5 * max(1.0, abs(z0))
    g, w = z.grad.double().cpu(), logits64.grad
    assert z.grad.dtype == dtype
    bound = 1e-4 * float(w.abs().max()) + UNIT_ROUNDOFF[dtype] * w.abs()
    assert bool(((g - w).abs() <= bound).all())


def test_reference_point_is_the_libraries_estimate():
    # S / C from an all-reduced (S, C), clamped at 0 unless told not to; C = 0 gives 0.
    assert kto_torch.reference_point(torch.tensor([3.0, 2.0], dtype=torch.float64)) == 1.5
    neg = torch.tensor([-3.0, 2.0], dtype=torch.float64)
    assert kto_torch.reference_point(neg) == 0.0
    assert kto_torch.reference_point(neg, clamp_kl=False) == -1.5
    assert kto_torch.reference_point(torch.tensor([0.0, 0.0], dtype=torch.float64)) == 0.0
    with pytest.raises((ValueError, RuntimeError), match="global_kl"):
        kto_torch.reference_point(torch.zeros(3, dtype=torch.float64))
