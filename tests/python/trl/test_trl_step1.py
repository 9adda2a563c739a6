"""Step-1 exactness (issue 11): at the first training step the policy equals the reference
model, so every log-ratio ρ = log π − log π_ref is 0 and so is the KL estimate z0; TRL 1.16's
own KTOTrainer logs loss 0.5 (1 − σ(0) with unit weights), kl 0 and rewards 0 — exactly, not
approximately, because both log-probs of each pair come from the same computation on the
same weights.

kto_torch.trl.KTOTrainer must log exactly the same values in every mode (default, logits,
fused linear with the default chunk and with a chunk small enough to split the batch) and
precision (fp32, and TRL's default bf16 autocast on the CPU). No tolerance: exactness holds
when the policy's and the reference's log-probs take bit-identical paths, which is what is
tested. The bug this guards (issue 11): under bf16 mixed precision the fused mode ran the
policy's decoder outside autocast (fp32) and the reference model's inside it (bf16), so ρ
and the KL estimate were bf16 rounding noise (loss 0.50013 and 0.500006 were seen).
"""

import copy

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
kto_trl = pytest.importorskip("kto_torch.trl")

import train_trl_kto as example  # noqa: E402  (examples/trl: tiny model, tokenizer, data)

MODES = {
    "stock_trl": None,
    "default": {},
    "logits": {"fused_linear": False},
    "fused": {"fused_linear": True},
    "fused_small_chunk": {"fused_linear": True, "fused_chunk_bytes": 4096},
}


def first_step_log(tmp_path, mode, bf16, loss_type="kto", label=lambda i, c: i % 3 == 0):
    policy = example.make_model(seed=0)
    args = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1,
                         logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                         disable_tqdm=True, bf16=bf16, loss_type=loss_type)
    kwargs = MODES[mode]
    cls = trl.KTOTrainer if kwargs is None else kto_trl.KTOTrainer
    trainer = cls(model=policy, ref_model=copy.deepcopy(policy), args=args,
                  train_dataset=example.make_dataset(n=16, label=label),
                  processing_class=example.make_tokenizer(), **(kwargs or {}))
    if kwargs is not None:
        assert trainer.fused_linear == kwargs.get("fused_linear", True)
    trainer.train()
    assert trainer.accelerator.native_amp == bf16  # bf16: the models really ran under autocast
    return next(h for h in trainer.state.log_history if "kl" in h)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("mode", list(MODES))
def test_step_one_logs_exactly_trls_values(tmp_path, mode, bf16):
    log = first_step_log(tmp_path, mode, bf16)
    assert log["loss"] == 0.5
    assert log["kl"] == 0.0
    assert log["rewards/chosen"] == 0.0
    assert log["rewards/rejected"] == 0.0
    assert log["rewards/margins"] == 0.0


@pytest.mark.parametrize("mode", ["stock_trl", "logits", "fused"])
def test_step_one_apo_zero_unpaired(tmp_path, mode):
    # No KL batch: 1 − σ(0) for the desirable side and σ(0) for the undesirable side, both 0.5.
    log = first_step_log(tmp_path, mode, bf16=True, loss_type="apo_zero_unpaired")
    assert log["loss"] == 0.5
    assert log["rewards/chosen"] == 0.0 and log["rewards/rejected"] == 0.0
