"""The TRL drop-in's fused head under FSDP2 (torch's fully_shard, two gloo processes on the
CPU): tests/python/trl/trl_fsdp2_worker.py drives kto_torch.trl.install_kto_head / HeadRequest,
the code the trainer runs, under fully_shard directly, because accelerate enables FSDP only on
accelerators (on the CPU it sets up DDP; see the worker's docstring).

Checked for both layouts (the lm_head in the root's FSDP unit, and sharded on its own so that
the head reads a DTensor weight and gathers it): each rank's loss over its half of the batch,
and every parameter's gradient after FSDP2's reduction, gathered, equal one process's over the
whole batch on an unsharded copy. Tolerance rule (kto_reference's): the same fp32
computations on the same rows, except that the gradients are averaged over two half-batches
instead of taken over the batch at once and the head's chunks differ (fp32 sums in another
order). The mean of the two ranks' losses and the whole batch's loss are each within 1e-5 of
the float64 reference (from the unsharded model's logits) times the loss's condition scale;
every gradient entry within twice 1e-5 times A_i, the gradient's scale (the worker computes
both, kto_reference.step_reference).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("kto_torch.trl")

import kto_reference as kr  # noqa: E402

WORKER = Path(__file__).with_name("trl_fsdp2_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("layout", ["root_head", "sharded_head"])
def test_fused_head_under_fsdp2_equals_one_process(tmp_path, layout):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", str(WORKER), "--out", str(tmp_path),
                          "--layout", layout], capture_output=True, text=True, timeout=240,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in range(2):
        record = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert record["weight_type"] == "DTensor"  # the model really is sharded
        losses = record["losses"]
        for what, loss in (("mean of the ranks' losses", sum(losses) / len(losses)),
                           ("one process's loss", record["loss"])):
            kr.assert_close_by_rule(loss, record["reference_loss"], record["loss_scale"],
                                    what=what)
        whole = record["grads_whole"]
        assert max(float(a.max()) for a in record["grad_scale"].values()) > 0
        kr.assert_gradients_by_rule(record["grads"], whole, record["grad_scale"],
                                    who=f"rank {rank}: FSDP2 vs one process")
