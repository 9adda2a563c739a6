"""Peer benchmark: TRL 1.16's own KTOTrainer step against kto_torch.trl.KTOTrainer.

    .venv/bin/python bench/compare_trl.py [--vocab 32000,128256] [--impls trl,default,logits,fused]
                                          [--steps 8] [--warmup 2] [--precision bf16|fp32]
                                          [--device cpu|cuda] [--lora] [--json out.json]

Every implementation trains the same model on the same data with the same
seed, through the whole trainer step (forward of the policy, the KL batch and
the reference model, loss, backward, AdamW update), with TRL's defaults
(KTOConfig: bf16 mixed precision, learning rate 1e-6, beta 0.1) and a batch of
8 sequences of 48 prompt + 48 completion tokens (the completion's last token
is EOS):

* trl:        `trl.KTOTrainer` (its fused LM head, trl/kernels/chunked_logprob.py;
              on the CPU the torch fallback, every position scored);
* default:    `kto_torch.trl.KTOTrainer` with no extra argument;
* logits:     `kto_torch.trl.KTOTrainer(..., fused_linear=False)`;
* fused:      `kto_torch.trl.KTOTrainer(..., fused_linear=True)` with its default chunk;
* fused:<MB>: the same with `fused_chunk_bytes = MB MiB` (for choosing that default).

With --lora every implementation trains a PEFT LoRA adapter (r = 16, alpha 32, on the
attention projections; the lm_head frozen, as in most KTO runs), passed as TRL's
``peft_config`` with no ref_model: the reference is the policy with its adapter
disabled, in TRL and in the drop-in alike (kto's fused head then computes no dW).

The model is a randomly initialised 2-layer Llama (hidden 256, MLP 1024,
4 heads, untied embeddings) whose lm_head dominates: at V = 32000 the head
and the embeddings hold 16.4 M of the model's 18.4 M parameters. Each
implementation runs in a fresh process (`--worker`); the time is the median
over `--steps` trainer steps after `--warmup` steps (each step timed from
`on_step_begin` to `on_step_end`, so the optimiser step is included), the
memory the peak RSS growth during `trainer.train()` (VmHWM reset through
/proc/self/clear_refs just before, minus VmRSS then; with `--device cuda` the
growth of torch.cuda.max_memory_allocated instead; warm-up steps included,
so the AdamW states count). The loss and metrics TRL logs at step 1 are
printed too: the policy equals the reference there, so TRL logs loss 0.5,
kl 0 and rewards 0. Printed with the table: the machine (CPU model, cores, torch
threads, load average before and after) and the CPU time other processes used
during the run (the machine's busy time from /proc/stat minus the workers'), so
that figures from a busy machine can be told apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT_TOKENS = 48
COMPLETION_TOKENS = 48  # 47 words + EOS
SEQUENCES = 8
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]


def make_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + [f"w{i}" for i in range(vocab - len(SPECIAL))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def make_model(vocab: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=2 * (PROMPT_TOKENS + COMPLETION_TOKENS),
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def make_dataset(vocab: int, rows: int, seed: int = 0):
    """`rows` examples of 48 prompt words and 47 completion words (TRL appends EOS), labels
    alternating desirable / undesirable."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    words = vocab - len(SPECIAL)

    def text(n):
        return " ".join(f"w{rng.randrange(words)}" for _ in range(n))

    return Dataset.from_list([{"prompt": text(PROMPT_TOKENS),
                               "completion": text(COMPLETION_TOKENS - 1),
                               "label": i % 2 == 0} for i in range(rows)])


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(impl: str, vocab: int, steps: int, warmup: int, precision: str = "bf16",
           device: str = "cpu", lora: bool = False) -> dict:
    import copy
    import gc

    import torch
    import trl
    from transformers import TrainerCallback

    total = warmup + steps
    policy = make_model(vocab)
    reference = copy.deepcopy(policy)
    data = make_dataset(vocab, SEQUENCES * total)
    kwargs = {}
    if lora:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                           task_type="CAUSAL_LM")
        reference = None  # the policy with its adapter disabled
    if impl == "trl":
        cls = trl.KTOTrainer
    else:
        from kto_torch.trl import KTOTrainer as cls
        if impl == "logits":
            kwargs["fused_linear"] = False
        elif impl.startswith("fused"):
            kwargs["fused_linear"] = True
            if ":" in impl:
                kwargs["fused_chunk_bytes"] = int(float(impl.split(":")[1]) * 2**20)
        elif impl != "default":
            raise SystemExit(f"unknown implementation {impl!r}")

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        args = trl.KTOConfig(output_dir=out, per_device_train_batch_size=SEQUENCES, max_steps=total,
                             logging_steps=1, report_to="none", use_cpu=device == "cpu",
                             save_strategy="no",
                             disable_tqdm=True, seed=0, bf16=precision == "bf16")
        trainer = cls(model=policy, ref_model=reference, args=args, train_dataset=data,
                      processing_class=make_tokenizer(vocab), callbacks=[timer], **kwargs)
        fused = getattr(trainer, "fused_linear", None)
        gc.collect()
        if device == "cuda":  # peak allocated by torch's caching allocator during train()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            trainer.train()
            torch.cuda.synchronize()
            peak_extra_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            base_kb = _status_kb("VmRSS")
            trainer.train()
            peak_extra_mb = (_status_kb("VmHWM") - base_kb) / 1024.0
    logged = [h for h in trainer.state.log_history if "kl" in h]
    first = logged[0]
    return {
        "impl": impl, "vocab": vocab, "step_s": statistics.median(timer.times[warmup:]),
        "step_times": timer.times, "peak_extra_mb": peak_extra_mb,
        "fused_ran": fused,
        "step1": {k: first[k] for k in ("loss", "kl", "rewards/chosen", "rewards/rejected")
                  if k in first},
        "torch_threads": torch.get_num_threads(),
    }


def _busy_jiffies() -> int:
    """CPU time (user + nice + system) of the whole machine so far, in clock ticks."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[1]) + int(fields[2]) + int(fields[3])


def machine() -> str:
    import torch

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    import transformers
    import trl

    if torch.cuda.is_available():
        model = f"{torch.cuda.get_device_name(0)} (host: {model})"
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), TRL {trl.__version__}, transformers "
            f"{transformers.__version__}, Python {platform.python_version()}; load average {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="32000,128256")
    parser.add_argument("--impls", default="trl,default,logits,fused")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="bf16 (TRL's default: bf16 autocast) or fp32 (bf16=False)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (peak RSS growth) or cuda (peak torch.cuda.max_memory_allocated "
                             "growth during train(); TRL's Triton head is the peer there)")
    parser.add_argument("--lora", action="store_true",
                        help="train a PEFT LoRA adapter (frozen lm_head), reference = adapter off")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = worker(args.worker[0], int(args.worker[1]), args.steps, args.warmup,
                        args.precision, args.device, args.lora)
        print("RESULT " + json.dumps(result))
        return

    print(f"machine: {machine()}")
    print(f"{SEQUENCES} sequences x ({PROMPT_TOKENS} prompt + {COMPLETION_TOKENS} completion) "
          f"tokens, median of {args.steps} steps after {args.warmup} warm-up, {args.precision}, "
          f"{'LoRA (r = 16, frozen lm_head), ' if args.lora else ''}each in a fresh process\n")
    results = []
    import resource

    ticks = os.sysconf("SC_CLK_TCK")
    start_busy, start_wall = _busy_jiffies(), time.monotonic()
    print("| V | impl | step (s) | vs trl | peak extra (MB) | vs trl | step-1 loss | step-1 kl |"
          " step-1 rewards/chosen |")
    print("|---|---|---|---|---|---|---|---|---|")
    for vocab in (int(v) for v in args.vocab.split(",")):
        base = None
        for impl in args.impls.split(","):
            run = subprocess.run([sys.executable, __file__, "--worker", impl, str(vocab),
                                  "--steps", str(args.steps), "--warmup", str(args.warmup),
                                  "--precision", args.precision, "--device", args.device,
                                  *(["--lora"] if args.lora else [])],
                                 capture_output=True, text=True)
            lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
            if run.returncode != 0 or not lines:
                print(f"| {vocab} | {impl} | failed: {run.stderr.strip().splitlines()[-1:]} |")
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            results.append(r)
            if impl == "trl":
                base = r
            speed = f"{base['step_s'] / r['step_s']:.2f}x" if base else "-"
            memory = f"{r['peak_extra_mb'] / base['peak_extra_mb']:.2f}x" if base else "-"
            s1 = r["step1"]
            print(f"| {vocab} | {impl} | {r['step_s']:.3f} | {speed} | {r['peak_extra_mb']:.0f} | "
                  f"{memory} | {s1.get('loss')!r} | {s1.get('kl')!r} | "
                  f"{s1.get('rewards/chosen')!r} |", flush=True)
    # What else ran meanwhile: the machine's CPU time minus this benchmark's own (its workers).
    own = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.monotonic() - start_wall
    others = (_busy_jiffies() - start_busy) / ticks - (own.ru_utime + own.ru_stime)
    print(f"\nmachine after: {machine()}")
    available = wall * os.cpu_count()
    print(f"other processes used {max(0.0, others):.0f} CPU-s of the {available:.0f} "
          f"available during the {wall:.0f} s run ({100 * max(0.0, others) / available:.1f} %)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "others_cpu_s": others, "wall_s": wall,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
