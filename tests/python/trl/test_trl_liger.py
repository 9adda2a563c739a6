"""``use_liger_kernel=True`` with the drop-in (issue 25, item 4): the drop-in takes its own
path and logs that Liger is not used; it never patches the model with Liger's kernels under
its own head. On a CPU, TRL 1.16 would apply Liger's Triton layer kernels when training
starts; the drop-in trains, its model's layers are transformers' own, step 1 is exact
(loss 0.5, kl 0, rewards 0) and the caller's config is left unchanged.
"""

import copy
import logging

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
kto_trl = pytest.importorskip("kto_torch.trl")

import train_trl_kto as example  # noqa: E402  (examples/trl: tiny model, tokenizer, data)


@pytest.mark.parametrize("positional", [False, True], ids=["args_keyword", "args_positional"])
@pytest.mark.parametrize("fused_linear", [None, False], ids=["default", "logits"])
def test_use_liger_kernel_is_ignored_and_logged(tmp_path, caplog, positional, fused_linear):
    policy = example.make_model(seed=0)
    layer_types = {type(m) for m in policy.modules()}
    config = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1,
                           logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                           disable_tqdm=True, bf16=False, use_liger_kernel=True)
    common = dict(train_dataset=example.make_dataset(n=16),
                  processing_class=example.make_tokenizer(), fused_linear=fused_linear)
    with caplog.at_level(logging.WARNING, logger="kto_torch.trl"):
        if positional:
            trainer = kto_trl.KTOTrainer(policy, copy.deepcopy(policy), config, **common)
        else:
            trainer = kto_trl.KTOTrainer(model=policy, ref_model=copy.deepcopy(policy),
                                         args=config, **common)
    assert "use_liger_kernel=True is ignored" in caplog.text
    assert config.use_liger_kernel  # the caller's config is untouched
    assert not trainer.args.use_liger_kernel
    trainer.train()
    assert {type(m) for m in trainer.model.modules()} == layer_types  # no Liger module
    log = next(h for h in trainer.state.log_history if "kl" in h)
    assert log["loss"] == 0.5 and log["kl"] == 0.0
    assert log["rewards/chosen"] == 0.0 and log["rewards/rejected"] == 0.0
