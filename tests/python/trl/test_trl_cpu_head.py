"""The logits path's lm_head on a CPU without bf16 GEMM units (issue 23, item 6).

Under TRL's default bf16 autocast, the model's lm_head runs a bf16 GEMM. On a CPU with no
bf16 units (no AVX512-BF16 / AMX; kto_torch.BF16_GEMM False) torch's bf16 GEMM is several
times slower than fp32 (14.8 against 80 GFLOP/s on an AVX2 EPYC), and the logits path forms
every [B, T, V] logit with it. There the drop-in multiplies the head in fp32 by default and
says so; ``autocast_lm_head=True`` keeps TRL's bf16 logits. Checked by the dtype the
lm_head's output has (a forward hook on the policy's and the reference's head; accelerate
converts the model's outputs to fp32 afterwards either way), on both kinds of CPU
(BF16_GEMM patched), and by step-1 exactness (loss 0.5, kl 0, rewards 0: policy and
reference take the same fp32 path).
"""

import copy
import logging

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
kto_torch = pytest.importorskip("kto_torch")
kto_trl = pytest.importorskip("kto_torch.trl")

import train_trl_kto as example  # noqa: E402  (examples/trl: tiny model, tokenizer, data)


def train_one_step(tmp_path, monkeypatch, bf16_gemm, **kwargs):
    """One bf16-autocast step of the logits path; returns (trainer, step-1 log, the dtypes of
    the lm_heads' outputs)."""
    monkeypatch.setattr(kto_torch, "BF16_GEMM", bf16_gemm)
    seen = []
    policy = example.make_model(seed=0)
    reference = copy.deepcopy(policy)
    for model in (policy, reference):
        model.get_output_embeddings().register_forward_hook(
            lambda module, inputs, output: seen.append(output.dtype))
    args = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1,
                         logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                         disable_tqdm=True, bf16=True)
    trainer = kto_trl.KTOTrainer(model=policy, ref_model=reference, args=args,
                                 train_dataset=example.make_dataset(n=16),
                                 processing_class=example.make_tokenizer(), fused_linear=False,
                                 **kwargs)
    trainer.train()
    assert trainer.accelerator.native_amp  # the models really ran under bf16 autocast
    return trainer, next(h for h in trainer.state.log_history if "kl" in h), seen


def assert_step_one_exact(log):
    assert log["loss"] == 0.5
    assert log["kl"] == 0.0
    assert log["rewards/chosen"] == 0.0 and log["rewards/rejected"] == 0.0


def test_no_bf16_units_head_in_fp32_and_logged(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="kto_torch.trl"):
        trainer, log, seen = train_one_step(tmp_path, monkeypatch, bf16_gemm=False)
    assert trainer.lm_head_in_fp32
    assert "the lm_head multiplies in fp32" in caplog.text
    assert seen and set(seen) == {torch.float32}  # policy, reference and KL forwards
    assert_step_one_exact(log)
    # The model's head is restored after each call.
    assert "forward" not in vars(trainer.model.get_output_embeddings())


def test_bf16_units_keep_autocast_head(tmp_path, monkeypatch):
    trainer, log, seen = train_one_step(tmp_path, monkeypatch, bf16_gemm=True)
    assert not trainer.lm_head_in_fp32
    assert seen and set(seen) == {torch.bfloat16}
    assert_step_one_exact(log)


def test_autocast_lm_head_true_keeps_trls_bf16_logits(tmp_path, monkeypatch):
    trainer, log, seen = train_one_step(tmp_path, monkeypatch, bf16_gemm=False,
                                        autocast_lm_head=True)
    assert not trainer.lm_head_in_fp32
    assert set(seen) == {torch.bfloat16}
    assert_step_one_exact(log)


def test_fp32_head_equals_the_fp32_product(tmp_path, monkeypatch):
    # The head's logits under the context are hidden·Wᵀ (+ b) in fp32 exactly.
    model = example.make_model(seed=1)
    head = model.get_output_embeddings()
    hidden = torch.randn(2, 5, head.in_features).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with kto_trl._lm_head_in_fp32(model):
            got = head(hidden)
        rounded = head(hidden)
    want = torch.nn.functional.linear(hidden.float(), head.weight.float(),
                                      None if head.bias is None else head.bias.float())
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert rounded.dtype == torch.bfloat16  # outside the context: autocast as before
