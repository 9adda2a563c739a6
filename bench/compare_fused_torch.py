"""Peer benchmark of the fused-linear KTO step: kto vs TRL 1.16, Liger, Cut Cross-Entropy
and PyTorch, on a GPU (a CPU run at small shapes checks the harness).

The same work for every case, Liger's (LigerFusedLinearKTOLoss with
use_ref_model=True, kl=None): the reference model's log-probs from its hidden
states and lm_head (no gradient), the policy's log-probs, the KTO loss with
z0 = 0 and its gradients to the policy hidden states and lm_head. bf16 inputs,
every token scored, B×T rows, vocabulary V.

  kto            kto_torch.fused_linear_logprobs (reference) + fused_linear_kto_loss
                 (reference_point="zero"), built with its CUDA kernels
  trl            TRL 1.16's chunked log-prob head (trl.kernels.ChunkedLogProbFunction:
                 Triton on a GPU, torch ops elsewhere; the vocabulary chunk its trainer
                 uses), summed per sequence, then the KTO loss in torch
  liger          liger_kernel.chunked_loss.LigerFusedLinearKTOLoss
  cce            cut_cross_entropy.linear_cross_entropy(..., reduction="none") (its CCE
                 kernel on a GPU, its torch.compile implementation on the CPU), summed
                 per sequence, then the KTO loss in torch
  torch          materialised logits: H @ W.T in bf16, log_softmax in fp32, eager
  torch.compile  the same function under torch.compile
A peer that is not installed is reported and skipped.

Reported per case: median step time over --reps (CUDA events on a GPU, after
--warmup runs; Liger and torch.compile compile in their first), peak allocated
memory during one step (torch.cuda.max_memory_allocated, inputs included; not on
the CPU), the loss and its distance to the loss with fp32 logits from the same
bf16 inputs, and the useful TFLOP/s (4·B·T·V·D: reference forward + policy
forward and two gradient GEMMs) against a bf16 8192³ matmul measured in the same
run.

  python bench/compare_fused_torch.py [--dims 1024,4096] [--batch 32] [--len 512]
                                      [--vocab 128256] [--reps 10] [--json out.json]
                                      [--device cuda|cpu] [--cases kto,trl,...]
"""

import argparse
import json
import statistics
import sys
import time

import torch


def matmul_peak(reps):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    for i in range(reps + 2):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(s.elapsed_time(e))
    return 2 * 8192**3 / (statistics.median(times) * 1e-3) / 1e12


def make_inputs(B, T, D, V, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    scale = 3.0 / D**0.5
    h = torch.randn(B, T, D, device=device, generator=g).to(torch.bfloat16)
    ref_h = torch.randn(B, T, D, device=device, generator=g).to(torch.bfloat16)
    w = (torch.randn(V, D, device=device, generator=g) * scale).to(torch.bfloat16)
    ref_w = (torch.randn(V, D, device=device, generator=g) * scale).to(torch.bfloat16)
    targets = torch.randint(0, V, (B, T), device=device, generator=g)
    labels = torch.arange(B, device=device) % 2 == 0
    return dict(h=h, ref_h=ref_h, w=w.requires_grad_(True), ref_w=ref_w, targets=targets,
                labels=labels)


def fp32_reference_loss(x, beta=0.1, rows=2048):
    """The loss with logits computed in fp32 (no TF32) from the same bf16 inputs, in row
    chunks: what the bf16 inputs define, to say whose loss is closer to it."""
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        def logps(h, w):
            B, T, D = h.shape
            flat, tgt, w32 = h.reshape(-1, D), x["targets"].reshape(-1), w.detach().float()
            out = torch.empty(B * T, dtype=torch.float64, device=h.device)
            for r in range(0, B * T, rows):
                z = flat[r:r + rows].float() @ w32.T
                out[r:r + rows] = (z.gather(-1, tgt[r:r + rows, None])[:, 0]
                                   - torch.logsumexp(z, -1)).double()
            return out.reshape(B, T).sum(-1)

        with torch.no_grad():
            return float(kto_loss(logps(x["h"], x["w"]), logps(x["ref_h"], x["ref_w"]),
                                  x["labels"], beta))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow


def kto_loss(policy_logp, reference_logp, labels, beta):
    """KTO with z0 = 0 (Liger's case): mean over sequences of 1 − σ(±β(π − ref))."""
    sign = torch.where(labels, 1.0, -1.0).to(policy_logp.dtype)
    return (1 - torch.sigmoid(beta * (policy_logp - reference_logp) * sign)).mean()


def per_sequence_step(logps):
    """A step from a per-sequence log-prob function logps(h [B,T,D], w, targets) → [B]."""

    def step(x, beta=0.1):
        h = x["h"].detach().requires_grad_(True)
        with torch.no_grad():
            ref = logps(x["ref_h"], x["ref_w"], x["targets"])
        loss = kto_loss(logps(h, x["w"], x["targets"]), ref, x["labels"], beta)
        loss.backward()
        return loss

    return step


def eager_logps(h, w, targets):
    logits = (h @ w.T).float()
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)


torch_step = per_sequence_step(eager_logps)


def torch_compile_step_factory():
    return per_sequence_step(torch.compile(eager_logps))


def trl_step_factory():
    from trl.kernels import ChunkedLogProbFunction

    try:  # the vocabulary chunk TRL 1.16's trainer passes (private; 32768 in 1.16)
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:
        chunk = 32768

    def logps(h, w, targets):
        B, T, D = h.shape
        per_token = ChunkedLogProbFunction.apply(h.reshape(-1, D), w, None, targets.reshape(-1),
                                                 1.0, chunk, None, 1.0, ())[0]
        return per_token.view(B, T).float().sum(-1)

    return per_sequence_step(logps)


def cce_step_factory(device):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if device == "cuda" else "torch_compile"  # its kernel needs CUDA

    def logps(h, w, targets):
        return -linear_cross_entropy(h, w, targets, reduction="none", impl=impl).float().sum(-1)

    return per_sequence_step(logps)


def kto_step(x, beta=0.1, **kw):
    import kto_torch

    h = x["h"].detach().requires_grad_(True)
    with torch.no_grad():
        chunk = {k: v for k, v in kw.items() if k == "chunk_bytes"}
        ref, _ = kto_torch.fused_linear_logprobs(x["ref_h"], x["ref_w"], x["targets"], **chunk)
    out = kto_torch.fused_linear_kto_loss(h, x["w"], x["targets"], None, ref, x["labels"],
                                          beta=beta, reference_point="zero", **kw)
    out.loss.backward()
    return out.loss


def liger_step_factory(beta=0.1):
    from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss

    fn = LigerFusedLinearKTOLoss(beta=beta, use_ref_model=True)  # β is the module's

    def step(x):
        h = x["h"].detach().requires_grad_(True)
        out = fn(h, x["w"], x["targets"], None, x["labels"], x["ref_h"], x["ref_w"], None, None)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss

    return step


def measure(step, x, reps, warmup):
    """(median ms, peak MB or None on the CPU, loss)."""
    cuda = x["h"].is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        x["w"].grad = None
        step(x)
    sync()
    times = []
    for _ in range(reps):
        x["w"].grad = None
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step(x)
            e.record()
            sync()
            times.append(s.elapsed_time(e))
        else:
            start = time.perf_counter()
            step(x)
            times.append((time.perf_counter() - start) * 1e3)
    x["w"].grad = None
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loss = step(x)
    sync()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    x["w"].grad = None
    return statistics.median(times), peak, float(loss.detach())


CASES = ("kto", "trl", "liger", "cce", "torch", "torch.compile")


def peer_steps(device, cases):
    """{label: step} of the requested cases that are usable here; says why others are not."""
    steps = {}

    def add(case, make):
        if case not in cases:
            return
        try:
            steps.update(make())
        except Exception as e:  # noqa: BLE001 - report any import failure and go on
            print(f"{case} not usable ({type(e).__name__}: {e}): {case} not measured")

    def kto_cases():
        import kto_torch

        if device == "cpu":
            return {"kto": kto_step}
        if not kto_torch._C.has_cuda():
            raise RuntimeError("kto_torch was built without its CUDA kernels")
        return {"kto (keep_chunk, 1 GiB)": kto_step,
                "kto (recompute, 1 GiB)": lambda x: kto_step(x, strategy="recompute"),
                "kto (vocab_blocks, 1 GiB)": lambda x: kto_step(x, strategy="vocab_blocks"),
                "kto (vocab_blocks, 256 MiB)":
                    lambda x: kto_step(x, strategy="vocab_blocks", chunk_bytes=256 << 20),
                "kto (keep_chunk, 4 GiB)": lambda x: kto_step(x, chunk_bytes=4 << 30),
                "kto (keep_chunk, 256 MiB)": lambda x: kto_step(x, chunk_bytes=256 << 20)}

    add("kto", kto_cases)
    add("trl", lambda: {"trl 1.16 chunked head": trl_step_factory()})
    add("liger", lambda: {"liger": liger_step_factory()})
    add("cce", lambda: {"cut cross-entropy": cce_step_factory(device)})
    add("torch", lambda: {"torch (materialised logits)": torch_step})
    add("torch.compile", lambda: {"torch.compile (materialised)": torch_compile_step_factory()})
    return steps


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--dims", default="1024,4096")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a check of the harness at small shapes (no memory, no peak)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("SKIPPED: no CUDA device")
        return 0
    cases = a.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"--cases: unknown {unknown}; choose from {','.join(CASES)}")
    steps = peer_steps(a.device, cases)
    cuda = a.device == "cuda"
    peak = matmul_peak(a.reps) if cuda else None
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device: {name}" + (f"; torch bf16 matmul 8192^3: {peak:.0f} TFLOP/s" if cuda else ""))
    rows = []
    for D in [int(d) for d in a.dims.split(",")]:
        x = make_inputs(a.batch, a.len, D, a.vocab, device=a.device)
        flop = 4 * 2 * a.batch * a.len * a.vocab * D / 1e12
        exact = fp32_reference_loss(x)
        print(f"D={D} loss with fp32 logits (the reference for the loss column): {exact:.6f}")
        for label, step in steps.items():
            try:
                ms, mb, loss = measure(step, x, a.reps, a.warmup)
            except Exception as e:  # noqa: BLE001 - one failing peer must not hide the others
                print(f"D={D} {label}: failed: {type(e).__name__}: {str(e)[:300]}")
                if cuda:
                    torch.cuda.empty_cache()
                continue
            tflops = flop / (ms * 1e-3)
            rows.append(dict(dim=D, case=label, ms=ms, peak_mb=mb, loss=loss, tflops=tflops,
                             fraction_of_peak=tflops / peak if peak else None,
                             loss_error=abs(loss - exact)))
            print(f"D={D} {label:30s} {ms:9.2f} ms {mb or float('nan'):9.0f} MB  "
                  f"loss {loss:.6f}  {tflops:6.1f} TFLOP/s", flush=True)
            if cuda:
                torch.cuda.empty_cache()
        del x
        if cuda:
            torch.cuda.empty_cache()
    print(f"\npeer comparison, B={a.batch} T={a.len} V={a.vocab} bf16, {name}"
          + (f" (matmul peak {peak:.0f} TFLOP/s)" if cuda else ""))
    print(f"{'D':>5} {'case':32s} {'ms':>9} {'peak MB':>9} {'TFLOP/s':>8} {'%peak':>6} "
          f"{'loss':>10} {'|loss-fp32|':>11}")
    for r in rows:
        frac = r["fraction_of_peak"]
        print(f"{r['dim']:5d} {r['case']:32s} {r['ms']:9.2f} {r['peak_mb'] or float('nan'):9.0f} "
              f"{r['tflops']:8.1f} {100 * frac if frac else float('nan'):5.0f}% "
              f"{r['loss']:10.6f} {r['loss_error']:11.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=name, matmul_tflops=peak, batch=a.batch, len=a.len,
                           vocab=a.vocab, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
