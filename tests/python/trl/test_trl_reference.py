"""Where the reference model comes from, through the TRL drop-in, against TRL 1.16's own
trainer on the same model, batch and options:

- PEFT (LoRA) without a ref_model, as TRL does it (trl.trainer.utils.use_adapter): the
  reference is the policy with its adapter disabled (a base model with a peft_config), or
  TRL's "ref" copy of the adapter (a PeftModel); only the adapter's weights train.
- precompute_ref_log_probs: the reference log-probs (and the KL batch's) are computed once
  by TRL before training and read from the batch.

Each runs our own loss path (TRL's _compute_loss is made to fail for ours), in the fused
default and the logits path. Tolerance: test_trl.py's, kto_reference's rule (fp32; each
metric and the loss of either trainer within 1e-5 of the float64 reference times its condition
scale, the gradients within twice 1e-5 times theirs), with the reference log-probs where the
step reads them: the adapter-disabled (or "ref" adapter) policy's, or the precomputed ones in
the batch, which both sides read exactly.
"""

import copy

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
kto_trl = pytest.importorskip("kto_torch.trl")

import train_trl_kto as example  # noqa: E402

import kto_reference as kr  # noqa: E402
from test_trl import assert_matches_trl  # noqa: E402


def loss_and_grads(trainer, batch):
    """test_trl.loss_and_grads over the trained parameters only (PEFT freezes the rest)."""
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
             if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    return loss.detach(), grads, metrics


def lora_config():
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                           target_modules=["q_proj", "v_proj", "gate_proj"])


def trainers(tmp_path, policy, reference, fused_linear, precompute, **extra):
    args = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1,
                         report_to="none", beta=0.3, use_cpu=True, save_strategy="no",
                         bf16=False, precompute_ref_log_probs=precompute,
                         **({"train_sampling_strategy": "sequential"} if precompute else {}))
    data = example.make_dataset(n=16, label=lambda i, c: i % 3 == 0)
    common = dict(args=args, train_dataset=data, processing_class=example.make_tokenizer(),
                  **extra)

    def ref():
        return copy.deepcopy(reference) if reference is not None else None

    theirs = trl.KTOTrainer(model=copy.deepcopy(policy), ref_model=ref(), **common)
    ours = kto_trl.KTOTrainer(model=copy.deepcopy(policy), ref_model=ref(),
                              fused_linear=fused_linear, fused_chunk_bytes=4096, **common)
    return theirs, ours


def train_the_adapter(*trainers):
    """The same change to the policy's adapter ("default") in each trainer, as a step of
    training would make: the reference (adapter disabled, or TRL's "ref" copy) stays."""
    for trainer in trainers:
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_" in name and ".default." in name:
                    p.add_(0.3 * torch.randn(p.shape, generator=generator))


def peft_policy(how):
    """(the policy, the trainer's extra arguments): a base model with a peft_config (TRL
    wraps it; reference = adapter disabled), or a PeftModel (TRL adds a "ref" adapter, a copy
    of "default", as the reference)."""
    base = example.make_model(seed=0)
    if how == "peft_config":
        return base, {"peft_config": lora_config()}
    return peft.get_peft_model(base, lora_config()), {}


def compare(theirs, ours, monkeypatch):
    batch = next(iter(theirs.get_train_dataloader()))
    assert next(iter(ours.get_train_dataloader())).keys() == batch.keys()
    loss_t, grads_t, metrics_t = loss_and_grads(theirs, batch)
    reference = kr.trl_reference(theirs, batch)

    def not_ours(*args, **kwargs):
        raise AssertionError("the drop-in fell back to TRL's own loss")

    monkeypatch.setattr(trl.KTOTrainer, "_compute_loss", not_ours)
    _, grads_o, _ = assert_matches_trl(reference, (loss_t, grads_t, metrics_t),
                                       loss_and_grads(ours, batch))
    return metrics_t, grads_o, reference


def assert_not_rounding(metrics, reference, key):
    """The metric is further from 0 than rounding could take it (ρ ≠ 0: the reference is not
    the policy)."""
    assert abs(metrics[key]) > kr.RTOL_FP32 * reference.scales[key], (key, metrics[key])


@pytest.mark.parametrize("fused_linear", [None, False], ids=["fused_default", "logits"])
@pytest.mark.parametrize("how", ["peft_config", "peft_model"])
def test_lora_without_ref_model(tmp_path, fused_linear, how, monkeypatch):
    policy, extra = peft_policy(how)
    theirs, ours = trainers(tmp_path, policy, None, fused_linear, precompute=False, **extra)
    assert ours.ref_model is None and ours.fused_linear == (fused_linear is None)
    assert ("ref" in ours.model.peft_config) == (how == "peft_model")
    train_the_adapter(theirs, ours)
    metrics_t, grads_o, reference = compare(theirs, ours, monkeypatch)
    assert_not_rounding(metrics_t, reference, "rewards/chosen")
    trained = {n for n, p in ours.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and ".default." in n for n in trained)
    assert all(float(grads_o[n].abs().max()) > 0 for n in trained)


@pytest.mark.parametrize("fused_linear", [None, False], ids=["fused_default", "logits"])
def test_precomputed_reference_log_probs(tmp_path, fused_linear, monkeypatch):
    policy = example.make_model(seed=0)
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theirs, ours = trainers(tmp_path, policy, reference, fused_linear, precompute=True)
    batch_keys = next(iter(ours.get_train_dataloader())).keys()
    assert "ref_logps" in batch_keys and "ref_KL_logps" in batch_keys
    metrics_t, _, reference = compare(theirs, ours, monkeypatch)
    assert_not_rounding(metrics_t, reference, "rewards/chosen")
