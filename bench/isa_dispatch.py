"""Runtime ISA dispatch against a native build: kto_torch.kto_loss, forward + backward.

    .venv/bin/python bench/isa_dispatch.py [--native DIR] [--shape 4,256,32000] [--reps 15]

Each row runs in a fresh process. ``dispatch`` is the installed (portable) package on its
own choice of CPU copy; ``x86-64`` / ``x86-64-v3`` / ``x86-64-v4`` force a copy with
KTO_CPU_ISA (those this CPU runs); ``native`` imports the package installed into DIR with
KTO_NATIVE=1 (``pip install --no-build-isolation --target DIR ./python/kto_torch``), built
for this very machine. Time: the median of --reps steps after two warm-ups, in one thread
and in all of the machine's threads. Ratios: native's time over each row's (1.0 = as fast
as native), per dtype (float32 and bfloat16 logits).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(shape: str, dtype_name: str, reps: int, threads: int) -> dict:
    import torch

    import kto_torch

    torch.set_num_threads(threads)
    B, T, V = (int(x) for x in shape.split(","))
    g = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(B, T, V, generator=g)).to(getattr(torch, dtype_name))
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, : T // 2] = -100  # prompt tokens: not scored
    ref = torch.randn(B, generator=g) - 50
    desirable = torch.tensor([i % 2 == 0 for i in range(B)])
    times = []
    for i in range(reps + 2):
        z = logits.clone().requires_grad_(True)
        start = time.perf_counter()
        out = kto_torch.kto_loss(z, labels, None, ref, desirable, reference_point="zero")
        out.loss.backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
    info = kto_torch.build_info()
    return {"median_s": statistics.median(times), "isa": info["dispatched_isa"],
            "simd": info["eigen_simd"]}


def run(row: str, native: str | None, shape: str, dtype: str, reps: int, threads: int) -> dict:
    env = dict(os.environ)
    env.pop("KTO_CPU_ISA", None)
    if row == "native":
        env["PYTHONPATH"] = native + os.pathsep + env.get("PYTHONPATH", "")
    elif row != "dispatch":
        env["KTO_CPU_ISA"] = row
    out = subprocess.run([sys.executable, __file__, "--worker", shape, dtype, str(reps),
                          str(threads)], env=env, capture_output=True, text=True, check=True,
                         cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--native", help="a KTO_NATIVE=1 install (pip --target DIR)")
    p.add_argument("--shape", default="4,256,32000")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        shape, dtype, reps, threads = a.worker
        print(json.dumps(worker(shape, dtype, int(reps), int(threads))))
        return
    import kto_torch

    info = kto_torch.build_info()
    rows = ["dispatch"] + [lvl for lvl in info["built_isas"]
                           if lvl.startswith("x86-64") and
                           kto_torch._isa._rank(lvl) <= kto_torch._isa._rank(info["cpu_isa"])]
    if a.native:
        rows.append("native")
    print(f"CPU level {info['cpu_isa']}, built {info['built_isas']}, torch {info['torch']}, "
          f"shape {a.shape}, median of {a.reps}")
    print(f"{'row':<10} {'dtype':<9} {'threads':>7} {'ISA':<10} {'ms':>8} {'native/row':>10}")
    for dtype in ("float32", "bfloat16"):
        for threads in (1, os.cpu_count()):
            results = {row: run(row, a.native, a.shape, dtype, a.reps, threads) for row in rows}
            base = results.get("native")
            for row, r in results.items():
                ratio = f"{base['median_s'] / r['median_s']:.2f}" if base else "-"
                print(f"{row:<10} {dtype:<9} {threads:>7} {r['isa']:<10} "
                      f"{1e3 * r['median_s']:>8.1f} {ratio:>10}")


if __name__ == "__main__":
    main()
