"""Parity with TRL itself (pinned in requirements.txt): TRL's own KTOTrainer
path — its per-sequence log-probs from the model and its KTO loss code — against
kto_torch.trl.KTOTrainer on the same model, batch and options: loss, metrics
and the gradient of every model parameter.

Tolerance: kto_reference's rule (tests/python/kto_reference.py, the twin of
tests/cpp/support.hpp). Both trainers compute in fp32 from the same weights and batch, in
different orders (TRL's chunked head and torch's kernels for this CPU's ISA; kto's lse kernel
or fused head). Each logged metric and the loss, of either trainer, must be within
rtol = 1e-5 of the float64 reference of the batch (kto_reference.trl_reference, from the
models' fp32 logits and the lm_head's inputs) times the quantity's condition scale: Σ|ℓ_r| +
|lse_r| (+ the lm_head products' rounding) over a log-prob's tokens, carried through ρ, the
means, z0 and the sigmoid's Lipschitz constant. Parameter gradients have no float64
reference: TRL's and kto's must agree within twice rtol times A_i, Σ over the sequences of
|∂logp_s/∂θ_i| weighted by how far rounding can move g_s = ∂L/∂logp_s (its own rounding, and
its sensitivity to ρ through σ''). The former bounds (1e-6 relative for metrics, 1e-4 of the
largest gradient entry) followed no rule and failed on an AVX2 CPU (issue 23). For bf16
logits the rule adds bf16's unit roundoff, 2^-8, times each logit's magnitude, carried the
same way (test_fused_linear_under_bf16_autocast).
"""

import copy

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
kto_trl = pytest.importorskip("kto_torch.trl")
kto_torch = pytest.importorskip("kto_torch")

import train_trl_kto as example  # noqa: E402  (examples/trl: tiny model, tokenizer, data)

import kto_reference as kr  # noqa: E402  (tests/python: the float64 reference and the rule)


def perturbed_pair(policy):
    """(policy, reference): a peaky reference (a copy of `policy` with noise on its lm_head)
    and a flatter, perturbed policy: mismatched (KL) pairs are likelier under the policy, so
    z0 > 0 and the reference point is exercised."""
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        reference.lm_head.weight.add_(torch.randn_like(reference.lm_head.weight))
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference


def make_trainers(tmp_path, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0,
                  label=lambda i, c: i % 3 == 0, fused=False, bf16=None, **ours_kwargs):
    policy, reference = perturbed_pair(example.make_model(seed=0))
    args = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1,
                         report_to="none", beta=0.3, loss_type=loss_type,
                         desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                         use_cpu=True, save_strategy="no",
                         **({} if bf16 is None else {"bf16": bf16}))
    data = example.make_dataset(n=16, label=label)
    common = dict(args=args, train_dataset=data, processing_class=example.make_tokenizer())
    theirs = trl.KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                            **common)
    # autocast_lm_head=True: under TRL's default bf16 autocast the logits path keeps TRL's bf16
    # logits even on a CPU without bf16 GEMM units, where it would multiply in fp32
    # (test_trl_cpu_head.py), so that the two trainers compute the same function.
    # padding_free=False: TRL's padded layout, so that under bf16 autocast (the reference
    # model's forward, which TRL prepares at construction) both trainers' backbones round
    # alike; the packed step is held to the padded one in test_trl_padding_free.py.
    ours = kto_trl.KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                              fused_linear=fused, fused_chunk_bytes=4096, **common,
                              **{"autocast_lm_head": True, "padding_free": False,
                                 **ours_kwargs})
    return theirs, ours


def loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_linear"])
@pytest.mark.parametrize(
    "loss_type,desirable_weight,undesirable_weight,label",
    [
        ("kto", 1.0, 1.0, lambda i, c: i % 3 == 0),
        ("kto", 2.0, 0.7, lambda i, c: i % 4 == 0),            # imbalanced weights
        ("kto", 1.0, 1.33, lambda i, c: False),                # empty desirable side
        ("kto", 1.0, 1.0, lambda i, c: True),                  # empty undesirable side
        ("apo_zero_unpaired", 1.0, 1.0, lambda i, c: i % 2 == 0),
    ],
)
def test_loss_metrics_and_gradients_match_trl(tmp_path, loss_type, desirable_weight,
                                              undesirable_weight, label, fused):
    # fused_linear: without mixed precision, so both paths are fp32 throughout (TRL's default
    # bf16 autocast rounds the reference model's logits, which the fused path never forms;
    # see test_fused_linear_under_bf16_autocast).
    theirs, ours = make_trainers(tmp_path, loss_type, desirable_weight, undesirable_weight, label,
                                 fused, bf16=False if fused else None)
    assert ours.fused_linear == fused  # the fused path really runs when asked
    batch = next(iter(theirs.get_train_dataloader()))
    assert batch["completion_mask"].sum() < batch["attention_mask"].sum()  # prompts are ignored
    theirs_out = loss_and_grads(theirs, batch)
    if loss_type == "kto":
        assert theirs_out[2]["kl"] > 0.0  # the reference point is exercised, not clamped to 0
    assert_matches_trl(kr.trl_reference(theirs, batch), theirs_out, loss_and_grads(ours, batch))


def test_fused_linear_under_bf16_autocast(tmp_path):
    """TRL's default (bf16=True), through trainer.train(), where both trainers run the policy
    and the reference model under bf16 autocast (accelerate wraps their forwards; the fused
    path enters the same context around the backbones it calls). The backbones' hidden
    states then agree bit for bit; TRL's fused head rounds each logit tile to bf16 (unit
    roundoff u = 2^-8) while kto multiplies the same bf16 operands with fp32 accumulation and
    output. By kto_reference's rule the two differ by twice the fp32 bound plus u times each
    logit's magnitude carried to the metric (a log-prob by u Σ_v |1[v = t] − p_v| |z_v| per
    token, then through ρ, z0 and the loss as the fp32 scales are:
    kto_reference.logit_rounding_scales), both from the batch of step 1, which TRL's step
    is watched for. Compared: what both log at step 1 (policy ≠ reference: the reference is
    perturbed)."""
    theirs, ours = make_trainers(tmp_path, fused=True)
    assert ours.args.bf16 and ours.fused_linear
    ours.args.logging_steps = 1  # (the two trainers share args)
    ours.args.max_steps = 2      # and it trains on: bf16 hidden states, fp32 lm_head weight
    step_one = []
    compute_loss = theirs.compute_loss

    def watched(model, inputs, *args, **kwargs):
        if not step_one:  # the models as step 1 sees them (the scales are magnitudes: fp32)
            step_one.append(kr.trl_reference(theirs, inputs, gradients=False))
        return compute_loss(model, inputs, *args, **kwargs)

    theirs.compute_loss = watched
    logs = []
    for trainer in (theirs, ours):
        assert trainer.train().global_step == 2
        logs.append(next(h for h in trainer.state.log_history if "kl" in h))
    metrics_t, metrics_o = logs
    assert metrics_t["kl"] > 0.0
    reference = step_one[0]
    rounding = kr.logit_rounding_scales(reference)
    u = kr.unit_roundoff(torch.bfloat16)
    for key in ("kl", "loss", "logps/chosen", "logps/rejected", "rewards/chosen",
                "rewards/rejected"):
        # Twice the fp32 bound (two fp32 computations), plus TRL's bf16 rounding alone.
        kr.assert_close_by_rule(metrics_o[key], metrics_t[key], 2 * reference.scales[key],
                                extra=u * rounding[key], what=key)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_linear"])
@pytest.mark.parametrize("key,bad", [("input_ids", len(example.WORDS)), ("input_ids", -1),
                                     ("KL_input_ids", len(example.WORDS) + 5)])
def test_token_ids_outside_the_vocabulary_are_refused_before_any_forward(tmp_path, fused, key,
                                                                        bad):
    _, ours = make_trainers(tmp_path, fused=fused)
    batch = next(iter(ours.get_train_dataloader()))
    batch[key] = batch[key].clone()
    batch[key][2, -1] = bad
    calls = []
    ours.model.register_forward_pre_hook(lambda module, args: calls.append(module))
    with pytest.raises(IndexError) as raised:
        ours.compute_loss(ours.model, batch)
    assert str(raised.value) == (
        f"kto_torch.trl.KTOTrainer: batch['{key}'] holds token id {bad}, outside the model's "
        f"vocabulary [0, {len(example.WORDS)}) (its input embedding rows): the tokenizer and "
        "the model disagree")
    assert "(in the batch check)" in raised.value.__notes__
    assert calls == []  # refused before the policy ran (the reference model runs after it)


@pytest.mark.skipif(not kto_torch.BF16_GEMM, reason="without the library's bf16 GEMM the fused "
                    "head multiplies in fp32 on the CPU: no cast to test")
def test_fp32_lm_head_under_bf16_autocast_gets_an_unrounded_gradient(tmp_path):
    """TRL's default: bf16 autocast over fp32 parameters. The fused head multiplies in bf16
    (where the library has a bf16 GEMM) but the fp32 lm_head's gradient is the fp32 sum,
    as TRL's own head gives it, not a bf16-rounded value widened back to fp32."""
    _, ours = make_trainers(tmp_path, fused=True)
    assert ours.args.bf16 and ours.fused_linear
    head = ours.model.lm_head.weight
    assert head.dtype == torch.float32
    batch = next(iter(ours.get_train_dataloader()))
    ours.compute_loss(ours.model, batch).backward()
    grad = head.grad
    assert grad.dtype == torch.float32 and bool(grad.abs().max() > 0)
    nonzero = grad != 0
    widened = grad.bfloat16().float()
    # A bf16-rounded gradient would equal its own rounding everywhere.
    assert float((widened != grad)[nonzero].float().mean()) > 0.9


def test_non_finite_precomputed_kl_reference_names_the_kl_estimate(tmp_path):
    """With precomputed reference log-probs, a NaN in ref_KL_logps fails in the KL estimate,
    after every forward: raised with that stage (over several ranks, carried to all of them
    by the all-reduce that follows, as each stage's failure is)."""
    _, ours = make_trainers(tmp_path, fused=True, bf16=False)
    batch = next(iter(ours.get_train_dataloader()))
    b = len(batch["label"])
    ours.precompute_ref_logps = True
    batch = dict(batch, ref_logps=torch.full((b,), -20.0), ref_KL_logps=torch.full((b,), -21.0))
    batch["ref_KL_logps"][1] = float("nan")
    with pytest.raises(ValueError) as raised:
        ours.compute_loss(ours.model, batch)
    assert "(in the KL estimate)" in raised.value.__notes__
    assert "argument 'kl_reference_logp[1]'" in str(raised.value), str(raised.value)


def test_one_import_trains(tmp_path):
    _, ours = make_trainers(tmp_path)
    ours.args.max_steps = 3
    ours.args.logging_steps = 1
    result = ours.train()
    assert result.global_step == 3
    logged = [h for h in ours.state.log_history if "kl" in h]
    assert logged and all("rewards/chosen" in h or "rewards/rejected" in h for h in logged)


@pytest.mark.parametrize("flags", [[], ["--fused-linear"]], ids=["logits", "fused_linear"])
def test_end_to_end_example_runs(flags):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(example.__file__)
    run = subprocess.run([sys.executable, str(script), "--steps", "6", *flags],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "kto_torch.trl.KTOTrainer" + ("(fused_linear=True)" if flags else ":") in run.stdout
    assert "rewards/margins" in run.stdout


def step_against_trl(tmp_path, policy, fused_linear):
    """One step of TRL 1.16's KTOTrainer and of the drop-in on the same model (perturbed into
    the policy; the unperturbed copy is the reference), batch and options, compared under
    this file's rule; returns (TRL's metrics, the drop-in's trainer, its gradients)."""
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    args = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1,
                         report_to="none", beta=0.3, use_cpu=True, save_strategy="no",
                         bf16=False)
    data = example.make_dataset(n=16, label=lambda i, c: i % 3 == 0)
    common = dict(args=args, train_dataset=data, processing_class=example.make_tokenizer())
    theirs = trl.KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                            **common)
    ours = kto_trl.KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                              fused_linear=fused_linear, fused_chunk_bytes=4096, **common)
    assert ours.fused_linear == (fused_linear is None)
    batch = next(iter(theirs.get_train_dataloader()))
    theirs_out = loss_and_grads(theirs, batch)
    _, grads_o, _ = assert_matches_trl(kr.trl_reference(theirs, batch), theirs_out,
                                       loss_and_grads(ours, batch))
    return theirs_out[2], ours, grads_o


def assert_matches_trl(reference, theirs, ours):
    """(loss, grads, metrics) of TRL's trainer and of the drop-in, under this file's rule:
    the loss and each metric of either within rtol · scale of the float64 reference
    (kto_reference.trl_reference of the batch), num_tokens equal, every gradient entry
    within 2 rtol · A_i of TRL's. Returns the drop-in's."""
    for who, (loss, _, metrics) in (("TRL", theirs), ("kto", ours)):
        kr.assert_metrics_by_rule(dict(metrics, loss=loss.item()), reference, who=who)
    assert theirs[2].get("num_tokens") == ours[2].get("num_tokens")
    assert max(float(a.max()) for a in reference.grad_scale.values()) > 0
    kr.assert_gradients_by_rule(ours[1], theirs[1], reference.grad_scale, who="kto vs TRL")
    return ours


def test_fused_strategy_reaches_the_op_and_is_checked(tmp_path, monkeypatch):
    """fused_strategy is the policy step's strategy (recompute: the same loss, metrics and
    gradients as keep_chunk under the fp32 rule); an unknown one, or vocab_blocks off CUDA,
    is refused when the trainer is made."""
    seen = []
    op = kto_torch.fused_linear_kto_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("strategy"))
        return op(*args, **kwargs)

    monkeypatch.setattr(kto_torch, "fused_linear_kto_loss", spy)
    _, keep = make_trainers(tmp_path, fused=True)
    _, recompute = make_trainers(tmp_path, fused=True, fused_strategy="recompute")
    batch = next(iter(keep.get_train_dataloader()))
    want, want_grads, want_metrics = loss_and_grads(keep, batch)
    got, got_grads, got_metrics = loss_and_grads(recompute, batch)
    assert seen == ["keep_chunk", "recompute"]
    # Under TRL's default bf16 autocast (both strategies alike): no float64 reference of the
    # bf16 hidden states, so the two are held to each other, with the batch's fp32 scales.
    reference = kr.trl_reference(keep, batch)
    got_metrics, want_metrics = dict(got_metrics, loss=got.item()), \
        dict(want_metrics, loss=want.item())
    for key in kr.TRL_METRICS:
        assert (key in got_metrics) == (key in want_metrics), key
        if key in want_metrics:
            kr.assert_pair_close_by_rule(got_metrics[key], want_metrics[key],
                                         reference.scales[key], what=key)
    kr.assert_gradients_by_rule(got_grads, want_grads, reference.grad_scale)
    with pytest.raises(ValueError, match=r"argument 'fused_strategy' must be one of"):
        make_trainers(tmp_path, fused=True, fused_strategy="tiles")
    with pytest.raises(ValueError, match=r"argument 'fused_strategy' must be 'keep_chunk' or "
                                         r"'recompute' on cpu \('vocab_blocks' runs on CUDA"):
        make_trainers(tmp_path, fused=True, fused_strategy="vocab_blocks")
