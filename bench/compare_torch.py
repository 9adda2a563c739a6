"""Peer benchmark: kto's PyTorch op against TRL's eager path and torch.compile of it.

    .venv/bin/python bench/compare_torch.py [--vocab 32000,128256] [--rows 2048] [--dtype float32]

The step measured is the logits-level part of a KTO step: per-sequence policy
log-probs of the target batch, the KTO loss (z0 from given KL log-probs) and
the backward to the logits.

* trl-eager:   TRL's own `selective_log_softmax` (trl.trainer.utils), masked
               sum, TRL's KTO loss formula (1 − σ(β(ρ − z0)), weights, mean)
               and autograd — what KTOTrainer does once it has the logits;
* trl-compile: the same function under torch.compile (compile time excluded);
* kto:         kto_torch.kto_loss and its backward.

Each configuration runs in a fresh process: time is the median of --reps runs
after a warm-up, peak memory the process's peak RSS above what it held once
the inputs existed (ru_maxrss, warm-up included — for torch.compile that
includes compilation; CPU only). Ratios are reported against
trl-eager in the same run. Liger Kernel's KTO loss needs a GPU (Triton) and is
not measured here.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(impl: str, vocab: int, rows: int, dtype_name: str, reps: int) -> dict:
    import torch

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    seqs, length = 8, rows // 8
    # Filled in place: no temporary may raise the RSS peak before the baseline.
    logits0 = torch.empty(seqs, length, vocab, dtype=dtype).normal_(0.0, 2.0)
    labels = torch.randint(0, vocab, (seqs, length))
    labels[:, : length // 4] = -100  # prompt tokens
    desirable = torch.arange(seqs) % 2 == 0
    ref_logp = torch.full((seqs,), -10.0 * length)
    kl_policy = torch.full((seqs,), -10.0 * length)
    kl_reference = kl_policy - 0.5
    beta, w_d, w_u = 0.1, 1.0, 1.0

    if impl == "kto":
        import kto_torch

        def step(z):
            out = kto_torch.kto_loss(z, labels, None, ref_logp, desirable, kl_policy, kl_reference,
                                     torch.full((seqs,), length), beta=beta)
            return out.loss
    else:
        from trl.trainer.utils import selective_log_softmax

        def step(z):
            mask = labels != -100
            per_token = selective_log_softmax(z.float(), labels.clamp(min=0))
            logps = (per_token * mask).sum(-1)
            kl = (kl_policy - kl_reference).mean().clamp(min=0)
            chosen = 1 - torch.sigmoid(beta * ((logps - ref_logp)[desirable] - kl))
            rejected = 1 - torch.sigmoid(beta * (kl - (logps - ref_logp)[~desirable]))
            return torch.cat((w_d * chosen, w_u * rejected)).nanmean()

        if impl == "trl-compile":
            step = torch.compile(step)

    def once():
        z = logits0.detach().requires_grad_(True)
        loss = step(z)
        loss.backward()
        return loss

    base = rss_mb()  # inputs exist; peak RSS so far is theirs
    once()  # warm-up (and compilation)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "vocab": vocab, "rows": rows, "dtype": dtype_name,
            "ms": 1e3 * statistics.median(times), "peak_extra_mb": rss_mb() - base,
            "logits_mb": logits0.numel() * logits0.element_size() / 2**20,
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", default="32000,128256")
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        impl, vocab, rows, dtype, reps = a.worker
        print(json.dumps(worker(impl, int(vocab), int(rows), dtype, int(reps))))
        return
    results = []
    for vocab in [int(v) for v in a.vocab.split(",")]:
        for impl in ("trl-eager", "trl-compile", "kto"):
            cmd = [sys.executable, __file__, "--worker", impl, str(vocab), str(a.rows), a.dtype,
                   str(a.reps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"KTO step (forward + backward to the logits), {a.rows} rows, {a.dtype}, "
          f"{results[0]['threads']} threads, median of {a.reps}")
    print(f"{'V':>7} {'impl':<12} {'time ms':>9} {'speedup':>8} {'peak extra MB':>14} "
          f"{'logits MB':>10}")
    for r in results:
        base = next(x for x in results if x["vocab"] == r["vocab"] and x["impl"] == "trl-eager")
        print(f"{r['vocab']:>7} {r['impl']:<12} {r['ms']:>9.1f} {base['ms'] / r['ms']:>7.2f}x "
              f"{r['peak_extra_mb']:>14.0f} {r['logits_mb']:>10.0f}")


if __name__ == "__main__":
    main()
