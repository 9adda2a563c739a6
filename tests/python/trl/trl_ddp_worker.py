"""One rank of a data-parallel KTO training step, launched by tests/python/trl/test_trl_ddp.py:

    python -m torch.distributed.run --nproc_per_node N tests/python/trl/trl_ddp_worker.py \
        --impl {trl,default,logits} --out DIR [--fault {none,nan_kl,bad_target}] \
        [--strategy {ddp,zero3}]

The trainer (TRL 1.16's own KTOTrainer, or kto_torch.trl.KTOTrainer with the fused head by
default or the logits path) runs one optimizer step on CPU over gloo. The global batch is 8
sequences, read in order (rank r gets sequences 4r..4r+3 of 2 ranks); every rank writes
DIR/rank<r>.pt with the logged loss and metrics and every parameter's gradient as the
optimizer sees it (clipping off), or the exception it raised.

Strategies:
- ddp: as accelerate sets it up under torchrun (MULTI_CPU, DistributedDataParallel); the
  gradients are read before the optimizer step, after DDP's all-reduce.
- zero3: DeepSpeed ZeRO stage 3 (parameters, gradients and optimizer states partitioned over
  the ranks) on DeepSpeed's CPU accelerator over gloo. The DeepSpeed engine steps inside the
  backward, where no callback reaches the partitioned gradients, so the optimizer is plain SGD
  at learning rate 1 and constant schedule: the gradient is the parameters' change, read
  gathered after the step. accelerate enables DeepSpeed without an accelerator only when its
  state is made beforehand with an explicit backend (TrainingArguments passes none), so the
  worker makes that state and the trainer uses it (use_configured_state).

The data are made so that one process over 8 sequences and two over 4 see the same step:
every prompt and completion has the same length (no padding differs), and completion 7
repeats completion 3, so TRL's KL pairs (completions rotated by one within each per-device
batch) are the same multiset either way.

Faults (rank 1 only): nan_kl puts a NaN in the policy's last hidden states when it runs
without gradients (the KL batch's forward); bad_target makes one target token id of the
target batch out of range.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples" / "trl"))
import train_trl_kto as example  # noqa: E402

GLOBAL_BATCH = 8


def make_dataset() -> Dataset:
    rng = random.Random(5)
    rows = []
    for i in range(GLOBAL_BATCH):
        prompt = " ".join(f"w{rng.randrange(28)}" for _ in range(3))
        completion = " " + " ".join(f"w{rng.randrange(28)}" for _ in range(4))
        rows.append({"prompt": prompt, "completion": completion, "label": i % 3 == 0})
    rows[7]["completion"] = rows[3]["completion"]
    return Dataset.from_list(rows)


def make_models():
    policy = example.make_model(seed=0)
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # policy != reference, so z0 > 0 and the gradients are not trivial
        gen = torch.Generator().manual_seed(1)
        reference.lm_head.weight.add_(0.3 * torch.randn(reference.lm_head.weight.shape,
                                                        generator=gen))
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return policy, reference


class GradientProbe(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {name.removeprefix("module."): p.grad.detach().clone()
                      for name, p in model.named_parameters() if p.grad is not None}


def inject_fault(trainer, fault: str, rank: int) -> None:
    if rank != 1 or fault == "none":
        return
    model = trainer.model
    if fault == "nan_kl":
        def poison(module, args, output):
            if torch.is_grad_enabled():
                return output
            output = output.clone()
            output[0, -2, 0] = float("nan")  # predicts the last completion token
            return output

        model.model.norm.register_forward_hook(poison)
    elif fault == "bad_target":
        original = trainer._compute_loss

        def corrupt(model, inputs, return_outputs):
            inputs = dict(inputs)
            ids = inputs["input_ids"].clone()
            ids[1, -1] = len(example.WORDS)  # the vocabulary size: one past the last id
            inputs["input_ids"] = ids
            return original(model, inputs, return_outputs)

        trainer._compute_loss = corrupt


# Persistence threshold 0: every parameter is partitioned, however small (by default ZeRO-3
# keeps parameters under 1e5 elements whole on every rank, this model's lm_head among them).
ZERO3_CONFIG = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                "zero_allow_untested_optimizer": True,
                "train_batch_size": GLOBAL_BATCH, "gradient_accumulation_steps": 1,
                "gradient_clipping": 0.0, "bf16": {"enabled": False},
                "fp16": {"enabled": False}}


def zero3_arguments(world: int) -> dict:
    """KTOConfig arguments for ZeRO-3 on the CPU; makes accelerate's state first (above)."""
    from datetime import timedelta

    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo", timeout=timedelta(seconds=120))
    config = dict(ZERO3_CONFIG, train_micro_batch_size_per_gpu=GLOBAL_BATCH // world)
    return {"deepspeed": config, "accelerator_config": {"use_configured_state": True},
            "optim": "sgd", "learning_rate": 1.0, "lr_scheduler_type": "constant"}


def gathered_parameters(model) -> dict:
    """Every parameter of a ZeRO-3 model, whole (gathered from the ranks' partitions)."""
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["trl", "default", "logits"], required=True)
    parser.add_argument("--fault", choices=["none", "nan_kl", "bad_target"], default="none")
    parser.add_argument("--strategy", choices=["ddp", "zero3"], default="ddp")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))

    import trl

    if args.impl == "trl":
        cls, extra = trl.KTOTrainer, {}
    else:
        from kto_torch.trl import KTOTrainer as cls
        extra = {"fused_linear": False} if args.impl == "logits" else {}
    strategy = zero3_arguments(world) if args.strategy == "zero3" else {"use_cpu": True}
    policy, reference = make_models()
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    probe = GradientProbe()
    record = {"rank": rank, "world": world, "impl": args.impl, "strategy": args.strategy}
    with tempfile.TemporaryDirectory() as out:
        config = trl.KTOConfig(output_dir=out, per_device_train_batch_size=GLOBAL_BATCH // world,
                               max_steps=1, logging_steps=1, report_to="none",
                               save_strategy="no", disable_tqdm=True, beta=0.3, bf16=False,
                               max_grad_norm=0.0, train_sampling_strategy="sequential",
                               ddp_timeout=120, **strategy)
        trainer = cls(model=policy, ref_model=reference, args=config,
                      train_dataset=make_dataset(), processing_class=example.make_tokenizer(),
                      callbacks=[probe], **extra)
        record["fused_linear"] = getattr(trainer, "fused_linear", None)
        inject_fault(trainer, args.fault, rank)
        try:
            trainer.train()
            record["log"] = next(h for h in trainer.state.log_history if "kl" in h)
            if args.strategy == "zero3":  # SGD at learning rate 1: the change is the gradient
                weight = trainer.model.lm_head.weight
                # Partitioned: this rank holds a slice; the head must gather it for the call.
                record["partitioned"] = weight.numel() == 0 and weight.ds_numel > 0
                after = gathered_parameters(trainer.model)
                record["grads"] = {name: before[name] - after[name] for name in after}
            else:
                record["grads"] = probe.grads
            record["distributed_type"] = str(trainer.accelerator.distributed_type)
            record["wrapped"] = type(trainer.model_wrapped).__name__
        except Exception as error:  # noqa: BLE001 — reported to the test
            record["error_type"] = type(error).__name__
            record["error"] = str(error)
            record["traceback"] = traceback.format_exc()
    torch.save(record, Path(args.out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
