"""Peer benchmark: TRL 1.16's own KTOTrainer step against kto_torch.trl.KTOTrainer.

    .venv/bin/python bench/compare_trl.py [--vocab 32000,128256] [--impls trl,default,logits,fused]
                                          [--steps 8] [--warmup 2] [--precision bf16|fp32]
                                          [--device cpu|cuda] [--lora] [--ragged [--sigma S]]
                                          [--threads N] [--json out.json]

Every implementation trains the same model on the same data with the same
seed, through the whole trainer step (forward of the policy, the KL batch and
the reference model, loss, backward, AdamW update), with TRL's defaults
(KTOConfig: bf16 mixed precision, learning rate 1e-6, beta 0.1) and a batch of
8 sequences of 48 prompt + 48 completion tokens (the completion's last token
is EOS):

* trl:        `trl.KTOTrainer` (its fused LM head, trl/kernels/chunked_logprob.py;
              on the CPU the torch fallback, every position scored);
* default:    `kto_torch.trl.KTOTrainer` with no extra argument (`padding_free=None`: a
              batch packed where that costs fewer estimated FLOPs);
* logits:     `kto_torch.trl.KTOTrainer(..., fused_linear=False)`;
* fused:      `kto_torch.trl.KTOTrainer(..., fused_linear=True)` with its default chunk;
* fused:<MB>: the same with `fused_chunk_bytes = MB MiB` (for choosing that default);
* <impl>+padded, <impl>+packed: any of the drop-in's with `padding_free=False` / `True`.

With --ragged the batches have realistic ragged lengths instead: each example's prompt
and completion lengths drawn lognormal (medians 64 and 128 tokens, sigma 0.75: a long
tail, clipped to [4, 512] and [4, 1024] tokens; the completion's last token is EOS),
max_length 2048, and the table adds tokens/s: the real (non-pad) tokens of the target
batches (TRL's `num_tokens`) over the timed steps' time, and the share of the padded
target batches' positions that are real; --sigma S draws both lengths with sigma S
instead. The default implementations there are TRL 1.16 (padded), the drop-in padded,
packed and by default (`trl,default+padded,default+packed,default`).

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
that figures from a busy machine can be told apart; on the CPU each row also gives
that share for its own `trainer.train()` ("others' CPU": of all the machine's cores).
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
# --ragged: lognormal lengths (median, sigma, clip range) of prompts and completions.
RAGGED_PROMPT = (64, 0.75, (4, 512))
RAGGED_COMPLETION = (128, 0.75, (4, 1024))  # EOS included
RAGGED_MAX_LENGTH = 2048


def make_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + [f"w{i}" for i in range(vocab - len(SPECIAL))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def make_model(vocab: int, seed: int = 0, positions: int = 2 * (PROMPT_TOKENS + COMPLETION_TOKENS)):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=positions,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def make_dataset(vocab: int, rows: int, seed: int = 0, lengths=None):
    """`rows` examples of 48 prompt words and 47 completion words (TRL appends EOS), or of
    `lengths`' (prompt tokens, completion tokens with the EOS) each, labels alternating
    desirable / undesirable."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    words = vocab - len(SPECIAL)

    def text(n):
        return " ".join(f"w{rng.randrange(words)}" for _ in range(n))

    lengths = lengths or [(PROMPT_TOKENS, COMPLETION_TOKENS)] * rows
    return Dataset.from_list([{"prompt": text(p), "completion": text(c - 1), "label": i % 2 == 0}
                              for i, (p, c) in enumerate(lengths)])


def ragged_lengths(rows: int, seed: int = 0, sigma: float = 0.0) -> list:
    """(prompt, completion) token counts of `rows` examples: lognormal, RAGGED_PROMPT and
    RAGGED_COMPLETION (the completion's count includes the EOS TRL appends); `sigma`, if
    given, in place of theirs."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(median, spread, bounds):
        spread = sigma or spread
        return np.clip(np.round(rng.lognormal(np.log(median), spread, rows)), *bounds).astype(int)

    return list(zip(draw(*RAGGED_PROMPT).tolist(), draw(*RAGGED_COMPLETION).tolist(),
                    strict=True))


def ragged_real_share(steps: int, seed: int = 0, sigma: float = 0.0) -> float:
    """The share of the padded target batches' positions (SEQUENCES × the longest) that are
    real tokens, over `steps` batches of ragged_lengths in order."""
    lengths = [p + c for p, c in ragged_lengths(SEQUENCES * steps, seed, sigma)]
    batches = [lengths[i:i + SEQUENCES] for i in range(0, len(lengths), SEQUENCES)]
    return sum(map(sum, batches)) / sum(SEQUENCES * max(b) for b in batches)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(impl: str, vocab: int, steps: int, warmup: int, precision: str = "bf16",
           device: str = "cpu", lora: bool = False, ragged: bool = False,
           threads: int = 0, sigma: float = 0.0) -> dict:
    import copy
    import gc

    import torch
    import trl
    from transformers import TrainerCallback

    if threads:
        torch.set_num_threads(threads)
    total = warmup + steps
    if ragged:
        policy = make_model(vocab, positions=RAGGED_MAX_LENGTH)
        data = make_dataset(vocab, SEQUENCES * total,
                            lengths=ragged_lengths(SEQUENCES * total, sigma=sigma))
    else:
        policy = make_model(vocab)
        data = make_dataset(vocab, SEQUENCES * total)
    reference = copy.deepcopy(policy)
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
        base, _, layout = impl.partition("+")
        if layout:
            if layout not in ("padded", "packed"):
                raise SystemExit(f"unknown layout {layout!r} in {impl!r} (padded or packed)")
            kwargs["padding_free"] = layout == "packed"
        if base == "logits":
            kwargs["fused_linear"] = False
        elif base.startswith("fused"):
            kwargs["fused_linear"] = True
            if ":" in base:
                kwargs["fused_chunk_bytes"] = int(float(base.split(":")[1]) * 2**20)
        elif base != "default":
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
    others_share = None
    with tempfile.TemporaryDirectory() as out:
        args = trl.KTOConfig(output_dir=out, per_device_train_batch_size=SEQUENCES, max_steps=total,
                             logging_steps=1, report_to="none", use_cpu=device == "cpu",
                             save_strategy="no",
                             disable_tqdm=True, seed=0, bf16=precision == "bf16",
                             **({"max_length": RAGGED_MAX_LENGTH} if ragged else {}))
        trainer = cls(model=policy, ref_model=reference, args=args, train_dataset=data,
                      processing_class=make_tokenizer(vocab), callbacks=[timer], **kwargs)
        fused = getattr(trainer, "fused_linear", None)
        packed = getattr(trainer, "padding_free", None)
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
            busy, own, wall = _busy_jiffies(), time.process_time(), time.monotonic()
            trainer.train()
            peak_extra_mb = (_status_kb("VmHWM") - base_kb) / 1024.0
            # The share of the machine other processes used while this one trained.
            others = ((_busy_jiffies() - busy) / os.sysconf("SC_CLK_TCK")
                      - (time.process_time() - own))
            others_share = max(0.0, others) / ((time.monotonic() - wall) * os.cpu_count())
    logged = [h for h in trainer.state.log_history if "kl" in h]
    first = logged[0]
    # Real (non-pad) tokens of each step's target batch: TRL's cumulative num_tokens.
    seen = [h["num_tokens"] for h in logged]
    tokens = [b - a for a, b in zip([0] + seen[:-1], seen, strict=True)]
    timed = timer.times[warmup:]
    return {
        "impl": impl, "vocab": vocab, "step_s": statistics.median(timed),
        "step_times": timer.times, "peak_extra_mb": peak_extra_mb,
        "tokens_per_s": sum(tokens[warmup:]) / sum(timed) if len(tokens) == total else None,
        "step_tokens": tokens,
        "fused_ran": fused, "padding_free_ran": packed, "others_cpu_share": others_share,
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
    parser.add_argument("--impls", default=None,
                        help="comma-separated (default trl,default,logits,fused; with --ragged "
                             "trl,default+padded,default+packed,default)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="bf16 (TRL's default: bf16 autocast) or fp32 (bf16=False)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (peak RSS growth) or cuda (peak torch.cuda.max_memory_allocated "
                             "growth during train(); TRL's Triton head is the peer there)")
    parser.add_argument("--lora", action="store_true",
                        help="train a PEFT LoRA adapter (frozen lm_head), reference = adapter off")
    parser.add_argument("--ragged", action="store_true",
                        help="lognormal prompt/completion lengths (medians 64/128, long tail); "
                             "adds tokens/s; default impls trl,default+padded,default+packed,"
                             "default")
    parser.add_argument("--sigma", type=float, default=0.0,
                        help="--ragged: the lognormal sigma of both lengths (default 0.75)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in each worker (0: torch's default)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.impls is None:
        args.impls = ("trl,default+padded,default+packed,default" if args.ragged
                      else "trl,default,logits,fused")
    if args.worker:
        result = worker(args.worker[0], int(args.worker[1]), args.steps, args.warmup,
                        args.precision, args.device, args.lora, args.ragged, args.threads,
                        args.sigma)
        print("RESULT " + json.dumps(result))
        return

    print(f"machine: {machine()}")
    if args.ragged:
        (pm, ps, pb), (cm, cs, cb) = RAGGED_PROMPT, RAGGED_COMPLETION
        ps, cs = args.sigma or ps, args.sigma or cs
        shape = (f"{SEQUENCES} sequences of lognormal prompt (median {pm}, sigma {ps}, in {pb}) + "
                 f"completion (median {cm}, sigma {cs}, in {cb}) tokens; "
                 f"{100 * ragged_real_share(args.warmup + args.steps, sigma=args.sigma):.0f} "
                 "% of the padded "
                 "target batches' positions are real tokens")
    else:
        shape = (f"{SEQUENCES} sequences x ({PROMPT_TOKENS} prompt + {COMPLETION_TOKENS} "
                 "completion) tokens")
    print(f"{shape}, median of {args.steps} steps after {args.warmup} warm-up, {args.precision}, "
          f"{'LoRA (r = 16, frozen lm_head), ' if args.lora else ''}each in a fresh process\n")
    results = []
    import resource

    ticks = os.sysconf("SC_CLK_TCK")
    start_busy, start_wall = _busy_jiffies(), time.monotonic()
    rate = " tokens/s | vs trl |" if args.ragged else ""
    print(f"| V | impl | step (s) | vs trl |{rate} peak extra (MB) | vs trl | step-1 loss |"
          " step-1 kl | step-1 rewards/chosen | others' CPU |")
    print("|---|---|---|---|" + ("---|---|" if args.ragged else "") + "---|---|---|---|---|---|")
    for vocab in (int(v) for v in args.vocab.split(",")):
        base = None
        for impl in args.impls.split(","):
            run = subprocess.run([sys.executable, __file__, "--worker", impl, str(vocab),
                                  "--steps", str(args.steps), "--warmup", str(args.warmup),
                                  "--precision", args.precision, "--device", args.device,
                                  "--threads", str(args.threads), "--sigma", str(args.sigma),
                                  *(["--lora"] if args.lora else []),
                                  *(["--ragged"] if args.ragged else [])],
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
            share = r.get("others_cpu_share")
            others = "-" if share is None else f"{100 * share:.0f} %"
            if args.ragged:
                ratio = (f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x"
                         if base and r["tokens_per_s"] and base["tokens_per_s"] else "-")
                tokens = (f" {r['tokens_per_s']:.0f} | {ratio} |" if r["tokens_per_s"]
                          else " - | - |")
            else:
                tokens = ""
            print(f"| {vocab} | {impl} | {r['step_s']:.3f} | {speed} |{tokens} "
                  f"{r['peak_extra_mb']:.0f} | {memory} | {s1.get('loss')!r} | {s1.get('kl')!r} | "
                  f"{s1.get('rewards/chosen')!r} | {others} |", flush=True)
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
