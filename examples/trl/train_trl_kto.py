"""Train a tiny causal LM with TRL's KTO loop running on kto ops — one import changed.

    python examples/trl/train_trl_kto.py [--steps 40] [--stock-trl | --fused-linear]

Everything is built in the script, offline: a word-level tokenizer over 28
words, a randomly initialised 2-layer Llama (transformers config, no weight
download), and a binary-feedback dataset whose completions are labelled
desirable when they contain the word "w7" (about one in four: an imbalanced
split, weighted per the KTO paper's band). The trainer is
`kto_torch.trl.KTOTrainer`, TRL's KTOTrainer with its log-prob and loss path on
kto's ops; `--fused-linear` takes the loss from the last hidden states and the
lm_head instead (`fused_linear=True`: the logits are never formed);
`--stock-trl` runs TRL's own class on the same data for comparison.
TRL's metrics are printed as it logs them.
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import KTOConfig

WORDS = ["<pad>", "<unk>", "<bos>", "<eos>"] + [f"w{i}" for i in range(28)]


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def make_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3)
    return LlamaForCausalLM(config)


def make_dataset(n: int = 96, seed: int = 0, label=None) -> Dataset:
    """Prompt and completion of random words; label = the binary feedback."""
    rng = random.Random(seed)
    label = label or (lambda i, completion: "w7" in completion.split())
    rows = []
    for i in range(n):
        prompt = " ".join(f"w{rng.randrange(28)}" for _ in range(3))
        completion = " ".join(f"w{rng.randrange(28)}" for _ in range(rng.randrange(2, 6)))
        if rng.random() < 0.25:  # make desirable completions common enough to learn from
            completion += " w7"
        rows.append({"prompt": prompt, "completion": completion, "label": label(i, completion)})
    return Dataset.from_list(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--stock-trl", action="store_true", help="use trl.KTOTrainer instead")
    mode.add_argument("--fused-linear", action="store_true",
                      help="kto_torch.trl.KTOTrainer(fused_linear=True): no logits formed")
    args = parser.parse_args()
    if args.stock_trl:
        from trl import KTOTrainer
    else:
        from kto_torch.trl import KTOTrainer

    data = make_dataset()
    n_desirable = sum(data["label"])
    n_undesirable = len(data) - n_desirable
    # The paper's band: 1 <= lambda_D n_D / (lambda_U n_U) <= 4/3; raise the minority side.
    desirable_weight = max(1.0, n_undesirable / max(1, n_desirable))
    policy = make_model()
    with tempfile.TemporaryDirectory() as out:
        config = KTOConfig(output_dir=out, per_device_train_batch_size=8, max_steps=args.steps,
                           learning_rate=5e-3, beta=0.1, desirable_weight=desirable_weight,
                           logging_steps=max(1, args.steps // 8), report_to="none",
                           use_cpu=True, save_strategy="no", disable_tqdm=True)
        extra = {"fused_linear": True} if args.fused_linear else {}
        trainer = KTOTrainer(model=policy, ref_model=copy.deepcopy(policy), args=config,
                             train_dataset=data, processing_class=make_tokenizer(), **extra)
        print(f"{type(trainer).__module__}.KTOTrainer{'(fused_linear=True)' if extra else ''}: "
              f"{n_desirable} desirable, "
              f"{n_undesirable} undesirable, desirable_weight {desirable_weight:.2f}")
        trainer.train()
    for entry in trainer.state.log_history:
        if "kl" in entry:
            keys = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                    "logps/chosen", "logps/rejected")
            print(f"step {entry['step']:4d}  " + "  ".join(
                f"{k} {entry[k]:+.4f}" for k in keys if k in entry))


if __name__ == "__main__":
    main()
