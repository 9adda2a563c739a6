"""Peer benchmark of the fused-linear KTO step on a GPU: kto vs Liger vs PyTorch.

The same work for all three, Liger's (LigerFusedLinearKTOLoss with
use_ref_model=True, kl=None): the reference model's log-probs from its hidden
states and lm_head (no gradient), the policy's log-probs, the KTO loss with
z0 = 0 and its gradients to the policy hidden states and lm_head. bf16 inputs,
every token scored, B×T rows, vocabulary V.

  kto       kto_torch.fused_linear_logprobs (reference) + fused_linear_kto_loss
            (reference_point="zero"), built with its CUDA kernels
  liger     liger_kernel.chunked_loss.LigerFusedLinearKTOLoss (if importable)
  torch     materialised logits: H @ W.T in bf16, log_softmax in fp32, eager

Reported per case: median step time over --reps (CUDA events, after --warmup
runs; Liger compiles in its first), peak allocated memory during one step
(torch.cuda.max_memory_allocated, inputs included), the loss (the three must
agree), and the useful TFLOP/s (4·B·T·V·D: reference forward + policy forward
and two gradient GEMMs) against a bf16 8192³ matmul measured in the same run.

  python bench/compare_fused_torch.py [--dims 1024,4096] [--batch 32] [--len 512]
                                      [--vocab 128256] [--reps 10] [--json out.json]
"""

import argparse
import json
import statistics
import sys

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


def make_inputs(B, T, D, V, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    scale = 3.0 / D**0.5
    h = torch.randn(B, T, D, device="cuda", generator=g).to(torch.bfloat16)
    ref_h = torch.randn(B, T, D, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(V, D, device="cuda", generator=g) * scale).to(torch.bfloat16)
    ref_w = (torch.randn(V, D, device="cuda", generator=g) * scale).to(torch.bfloat16)
    targets = torch.randint(0, V, (B, T), device="cuda", generator=g)
    labels = torch.arange(B, device="cuda") % 2 == 0
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
            ratio = logps(x["h"], x["w"]) - logps(x["ref_h"], x["ref_w"])
            sign = torch.where(x["labels"], 1.0, -1.0).double()
            return float((1 - torch.sigmoid(beta * ratio * sign)).mean())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow


def torch_step(x, beta=0.1):
    def logps(h, w):
        logits = (h @ w.T).float()
        lp = torch.log_softmax(logits, -1).gather(-1, x["targets"].unsqueeze(-1)).squeeze(-1)
        return lp.sum(-1)

    h = x["h"].detach().requires_grad_(True)
    with torch.no_grad():
        ref = logps(x["ref_h"], x["ref_w"])
    ratio = logps(h, x["w"]) - ref
    sign = torch.where(x["labels"], 1.0, -1.0)
    loss = (1 - torch.sigmoid(beta * ratio * sign)).mean()
    loss.backward()
    return loss


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


def liger_step_factory():
    from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss

    fn = LigerFusedLinearKTOLoss(beta=0.1, use_ref_model=True)

    def step(x, beta=0.1):
        h = x["h"].detach().requires_grad_(True)
        out = fn(h, x["w"], x["targets"], None, x["labels"], x["ref_h"], x["ref_w"], None, None)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss

    return step


def measure(step, x, reps, warmup):
    for _ in range(warmup):
        x["w"].grad = None
        step(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        x["w"].grad = None
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step(x)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    x["w"].grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loss = step(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20
    x["w"].grad = None
    return statistics.median(times), peak, float(loss.detach())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dims", default="1024,4096")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device")
        return 0
    steps = {}
    try:
        import kto_torch

        if kto_torch._C.has_cuda():
            steps["kto (keep_chunk, 1 GiB)"] = kto_step
            steps["kto (recompute, 1 GiB)"] = lambda x: kto_step(x, strategy="recompute")
            steps["kto (keep_chunk, 4 GiB)"] = lambda x: kto_step(x, chunk_bytes=4 << 30)
            steps["kto (keep_chunk, 256 MiB)"] = lambda x: kto_step(x, chunk_bytes=256 << 20)
        else:
            print("kto_torch has no CUDA kernels: kto not measured")
    except ImportError as e:
        print(f"kto_torch not importable ({e}): kto not measured")
    try:
        steps["liger"] = liger_step_factory()
    except Exception as e:  # noqa: BLE001 - report any import failure and go on
        print(f"liger-kernel not usable ({type(e).__name__}: {e}): liger not measured")
    steps["torch (materialised logits)"] = torch_step

    peak = matmul_peak(a.reps)
    name = torch.cuda.get_device_name()
    print(f"device: {name}; torch bf16 matmul 8192^3: {peak:.0f} TFLOP/s")
    rows = []
    for D in [int(d) for d in a.dims.split(",")]:
        x = make_inputs(a.batch, a.len, D, a.vocab)
        flop = 4 * 2 * a.batch * a.len * a.vocab * D / 1e12
        exact = fp32_reference_loss(x)
        print(f"D={D} loss with fp32 logits (the reference for the loss column): {exact:.6f}")
        for label, step in steps.items():
            try:
                ms, mb, loss = measure(step, x, a.reps, a.warmup)
            except Exception as e:  # noqa: BLE001 - one failing peer must not hide the others
                print(f"D={D} {label}: failed: {type(e).__name__}: {str(e)[:300]}")
                torch.cuda.empty_cache()
                continue
            tflops = flop / (ms * 1e-3)
            rows.append(dict(dim=D, case=label, ms=ms, peak_mb=mb, loss=loss, tflops=tflops,
                             fraction_of_peak=tflops / peak, loss_error=abs(loss - exact)))
            print(f"D={D} {label:30s} {ms:9.2f} ms {mb:9.0f} MB  loss {loss:.6f}  "
                  f"{tflops:6.1f} TFLOP/s ({100 * tflops / peak:.0f}% of matmul)", flush=True)
            torch.cuda.empty_cache()
        del x
        torch.cuda.empty_cache()
    print(f"\npeer comparison, B={a.batch} T={a.len} V={a.vocab} bf16, {name} "
          f"(matmul peak {peak:.0f} TFLOP/s)")
    print(f"{'D':>5} {'case':32s} {'ms':>9} {'peak MB':>9} {'TFLOP/s':>8} {'%peak':>6} "
          f"{'loss':>10} {'|loss-fp32|':>11}")
    for r in rows:
        print(f"{r['dim']:5d} {r['case']:32s} {r['ms']:9.2f} {r['peak_mb']:9.0f} "
              f"{r['tflops']:8.1f} {100 * r['fraction_of_peak']:5.0f}% {r['loss']:10.6f} "
              f"{r['loss_error']:11.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=name, matmul_tflops=peak, batch=a.batch, len=a.len,
                           vocab=a.vocab, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
