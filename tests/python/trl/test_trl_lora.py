"""A PEFT LoRA policy through the TRL drop-in's fused head (issue 25, item 1): LoRA freezes
the lm_head, so the fused step asks the library for no dW (the op returns an empty [0, D]
tensor in its place: no [V, D] fp32 array, one GEMM pass fewer). Checked against TRL 1.16's
own trainer and against the drop-in's logits path on the same LoRA model, batch and options,
under kto_reference's rule (test_trl.py's assert_matches_trl: each metric and the loss within
1e-5 of the float64 reference times its condition scale, every trained gradient within twice
1e-5 times A_i of TRL's), and step 1 is exact (loss 0.5, kl 0, rewards 0: the adapter starts
at zero, so the policy is the reference bit for bit).
"""

import copy

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
kto_torch = pytest.importorskip("kto_torch")
kto_trl = pytest.importorskip("kto_torch.trl")

import train_trl_kto as example  # noqa: E402

import kto_reference as kr  # noqa: E402
from test_trl import assert_matches_trl  # noqa: E402
from test_trl_reference import lora_config, loss_and_grads, train_the_adapter  # noqa: E402


class HeadSpy:
    """Wraps kto_torch.fused_linear_kto_loss: what the drop-in's fused head asked for. The op's
    autograd node keeps (dH, dW, db) for the backward; dW's shape says whether the library
    computed it."""

    def __init__(self, monkeypatch):
        self.calls = []
        op = kto_torch.fused_linear_kto_loss

        def spy(hidden, weight, *args, **kwargs):
            out = op(hidden, weight, *args, **kwargs)
            node = out.loss.grad_fn
            while node is not None and "fused_linear_forward" not in type(node).__name__:
                node = node.next_functions[0][0]
            saved = node.saved_tensors if node is not None else None
            self.calls.append(dict(weight_requires_grad=weight.requires_grad,
                                   weight_shape=tuple(weight.shape),
                                   dw_shape=tuple(saved[1].shape) if saved else None))
            return out

        monkeypatch.setattr(kto_torch, "fused_linear_kto_loss", spy)


def make_trainers(tmp_path, bf16=False, **extra):
    """TRL's trainer, the drop-in's fused default and its logits path on one LoRA policy
    (the reference: the policy with its adapter disabled, as TRL does it)."""
    args = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1,
                         report_to="none", beta=0.3, use_cpu=True, save_strategy="no",
                         bf16=bf16, logging_steps=1, disable_tqdm=True)
    data = example.make_dataset(n=16, label=lambda i, c: i % 3 == 0)
    common = dict(args=args, train_dataset=data, processing_class=example.make_tokenizer(),
                  peft_config=lora_config(), **extra)
    policy = example.make_model(seed=0)
    theirs = trl.KTOTrainer(model=copy.deepcopy(policy), **common)
    fused = kto_trl.KTOTrainer(model=copy.deepcopy(policy), fused_chunk_bytes=4096, **common)
    logits = kto_trl.KTOTrainer(model=copy.deepcopy(policy), fused_linear=False, **common)
    assert fused.fused_linear and not logits.fused_linear
    return theirs, fused, logits


def test_lora_gradients_match_trl_and_the_logits_path_through_the_frozen_head(tmp_path,
                                                                              monkeypatch):
    theirs, fused, logits = make_trainers(tmp_path)
    head = fused.model.get_output_embeddings()
    assert not head.weight.requires_grad  # LoRA froze the lm_head
    train_the_adapter(theirs, fused, logits)  # policy ≠ reference: ρ, z0 and the loss move
    batch = next(iter(theirs.get_train_dataloader()))
    reference = kr.trl_reference(theirs, batch)
    want = loss_and_grads(theirs, batch)
    spy = HeadSpy(monkeypatch)
    _, grads_f, _ = assert_matches_trl(reference, want, loss_and_grads(fused, batch))
    # The policy's step went through the fused head, frozen: the op computed no dW.
    steps = [c for c in spy.calls if c["dw_shape"] is not None]
    assert steps, spy.calls
    for call in steps:
        assert not call["weight_requires_grad"]
        assert call["dw_shape"] == (0, call["weight_shape"][1])
    assert head.weight.grad is None
    spy.calls.clear()
    _, grads_l, _ = assert_matches_trl(reference, want, loss_and_grads(logits, batch))
    assert not spy.calls  # the logits path does not use the fused head
    # The fused and the logits paths agree with each other under the same rule.
    assert grads_f.keys() == grads_l.keys() and grads_f
    assert all("lora_" in name for name in grads_f)
    kr.assert_gradients_by_rule(grads_f, grads_l, reference.grad_scale, who="fused vs logits")
    assert all(float(g.abs().max()) > 0 for g in grads_f.values())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("mode", ["stock_trl", "fused", "fused_small_chunk", "logits"])
def test_lora_step_one_is_exact(tmp_path, mode, bf16, monkeypatch):
    """Step 1 with a fresh adapter (lora_B = 0): the policy and the reference (adapter
    disabled) take bit-identical paths, so TRL's values are exact in every mode."""
    args = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1,
                         logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                         disable_tqdm=True, bf16=bf16)
    kwargs = {"stock_trl": None, "fused": {}, "fused_small_chunk": {"fused_chunk_bytes": 4096},
              "logits": {"fused_linear": False}}[mode]
    cls = trl.KTOTrainer if kwargs is None else kto_trl.KTOTrainer
    spy = HeadSpy(monkeypatch)
    trainer = cls(model=example.make_model(seed=0), args=args, peft_config=lora_config(),
                  train_dataset=example.make_dataset(n=16, label=lambda i, c: i % 3 == 0),
                  processing_class=example.make_tokenizer(), **(kwargs or {}))
    trainer.train()
    assert trainer.accelerator.native_amp == bf16
    if mode.startswith("fused"):
        steps = [c for c in spy.calls if c["dw_shape"] is not None]
        assert steps and all(c["dw_shape"][0] == 0 for c in steps)
    log = next(h for h in trainer.state.log_history if "kl" in h)
    assert log["loss"] == 0.5
    assert log["kl"] == 0.0
    assert log["rewards/chosen"] == 0.0
    assert log["rewards/rejected"] == 0.0
    assert log["rewards/margins"] == 0.0
