"""Non-finite model outputs (issue 11): TRL's KTO suite trains a float16 model at learning rate
0.1, where stock TRL 1.16 goes on into NaN parameters and logs loss 0. kto_torch.trl keeps
raising at the first non-finite log-prob, and its message says what most likely happened and
what to try: NonFiniteModelOutputError, a ValueError, with the library's own error chained."""

import copy
import re

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
kto_trl = pytest.importorskip("kto_torch.trl")

import train_trl_kto as example  # noqa: E402


def make_trainer(tmp_path, policy, fused, **config):
    args = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to="none",
                         use_cpu=True, save_strategy="no", disable_tqdm=True,
                         **{"max_steps": 12, "bf16": False, **config})
    return kto_trl.KTOTrainer(model=policy, ref_model=copy.deepcopy(policy), args=args,
                              train_dataset=example.make_dataset(n=96),
                              processing_class=example.make_tokenizer(), fused_linear=fused)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_linear"])
def test_float16_at_learning_rate_0_1_says_what_to_try(tmp_path, fused):
    trainer = make_trainer(tmp_path, example.make_model(seed=0).to(torch.float16), fused,
                           learning_rate=0.1)
    with pytest.raises(kto_trl.NonFiniteModelOutputError) as raised:
        trainer.train()
    assert isinstance(raised.value, ValueError)
    message = str(raised.value)
    assert 1 <= trainer.state.global_step < 12  # it trained, then stopped at the overflow
    assert message.startswith("kto_torch.trl.KTOTrainer: non-finite values (NaN/inf) in the ")
    assert f"at step {trainer.state.global_step + 1} (parameters float16" in message
    assert "Most likely cause: a float16 overflow" in message
    for remedy in ("bf16 (bf16=True", "fp32 instead of float16",
                   "a lower learning rate (now 0.1; TRL's default is 1e-6)",
                   "tighter gradient clipping (max_grad_norm, now 1)"):
        assert remedy in message, remedy
    # The library's error is kept: its text, and chained as the cause.
    assert re.search(r"Library error: kto_torch\.\w+: argument '\w+' must", message)
    assert isinstance(raised.value.__cause__, ValueError)
    assert str(raised.value.__cause__) in message


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_linear"])
def test_diverged_parameters_are_named_as_the_cause(tmp_path, fused):
    policy = example.make_model(seed=0)
    trainer = make_trainer(tmp_path, policy, fused, max_steps=1, max_grad_norm=0.0)
    with torch.no_grad():  # as if an earlier update had diverged (the reference stays finite)
        trainer.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(kto_trl.NonFiniteModelOutputError) as raised:
        trainer.train()
    message = str(raised.value)
    assert "in the policy's forward" in message
    assert "(parameters float32, no mixed precision)" in message
    n = len(list(policy.parameters()))
    assert (f"Most likely cause: the policy diverged: 1 of its {n} parameter tensors already "
            "hold NaN/inf") in message
    assert "gradient clipping (max_grad_norm=1.0; now off)" in message


def test_other_errors_are_not_rewritten(tmp_path):
    # A non-finite option is the caller's error, not the model's: the library's ValueError as is.
    trainer = make_trainer(tmp_path, example.make_model(seed=0), False, max_steps=1)
    trainer.beta = float("nan")
    with pytest.raises(ValueError, match="kto_torch.kto_loss: argument 'beta'") as raised:
        trainer.train()
    assert not isinstance(raised.value, kto_trl.NonFiniteModelOutputError)
