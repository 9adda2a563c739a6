"""Gloo processes for the torch.distributed tests: spawn `world` ranks of main(rank,
init_file, payload, out_dir) (a file rendezvous), each saving rank{r}.pt in out_dir, and
join them with a deadline, so that a rank left waiting in a collective fails the test
instead of hanging it."""

import os
import tempfile
import time

import pytest
import torch


def spawn_ranks(main, world: int, payload, deadline_s: float) -> list:
    """Each rank's saved records, in rank order."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.spawn(main, args=(os.path.join(tmp, "init"), payload, tmp), nprocs=world,
                       join=False)
        deadline = time.monotonic() + deadline_s
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail("the ranks did not finish: a collective is waiting for a rank")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
