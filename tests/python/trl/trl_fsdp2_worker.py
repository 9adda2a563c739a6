"""One rank of the fused KTO head under FSDP2 (torch's fully_shard over gloo, CPU), launched by
tests/python/trl/test_trl_fsdp2.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/python/trl/trl_fsdp2_worker.py \
        --out DIR --layout {root_head,sharded_head}

accelerate enables FSDP only on accelerators (its state leaves MULTI_CPU out of FSDP), so
TRL's trainer cannot run FSDP2 on the CPU; this drives the same code path the trainer uses,
kto_torch.trl.install_kto_head and HeadRequest, under fully_shard directly: each rank calls
model(**inputs, kto_head=request) on its half of the global batch and back-propagates; the
gradients FSDP2 reduce-scatters are gathered (full_tensor) and saved with a one-process
computation of the same loss over the whole batch on an unsharded copy.

Layouts: root_head shards the decoder layers and the root (the lm_head is the root's, so its
weight is unsharded inside the forward); sharded_head also shards the lm_head on its own, so
that inside the forward its weight is a DTensor the head gathers itself, its gradient
averaged over the ranks on the way back (kto_torch.trl's _gathered). Each rank also saves the
float64 reference of the whole batch's step and its condition scales (kto_reference's rule),
from the unsharded copy before anything runs on it.
"""

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples" / "trl"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/python: kto_reference
import train_trl_kto as example  # noqa: E402

import kto_reference as kr  # noqa: E402
from kto_torch.trl import HeadRequest, install_kto_head  # noqa: E402

B, T, COMPLETION = 8, 10, 5
BETA, Z0 = 0.3, 0.7


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, len(example.WORDS), (B, T), generator=g)
    completion_mask = torch.zeros(B, T, dtype=torch.int64)
    completion_mask[:, T - COMPLETION:] = 1
    return dict(ids=ids, mask=torch.ones(B, T, dtype=torch.int64),
                completion_mask=completion_mask,
                reference_logp=-20.0 - 5.0 * torch.rand(B, generator=g),
                desirable=torch.rand(B, generator=g) < 0.5)


def loss_of(model, data, rows):
    loss = dict(reference_logp=data["reference_logp"][rows], desirable=data["desirable"][rows],
                reference_point="fixed", fixed_z0=Z0, beta=BETA)
    request = HeadRequest(data["completion_mask"][rows], contextlib.nullcontext, 4096, loss)
    return model(input_ids=data["ids"][rows], attention_mask=data["mask"][rows],
                 kto_head=request)


def step_reference(model, data):
    """kto_reference's float64 step of the whole batch (z0 fixed, reference log-probs given:
    both exact) with the scales of its loss and of every parameter's gradient."""
    inputs = dict(input_ids=data["ids"], attention_mask=data["mask"], use_cache=False)
    head = kr.head_forward(model, inputs, data["completion_mask"], grad=True)
    reference_logp = data["reference_logp"].double()
    return kr.step_reference(head, reference_logp, reference_logp.abs(), data["desirable"],
                             dict(beta=BETA), z0=Z0, params=dict(model.named_parameters()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layout", choices=["root_head", "sharded_head"], required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    model = example.make_model(seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    whole = copy.deepcopy(model)
    data = batch()
    reference = step_reference(whole, data)

    install_kto_head(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if args.layout == "sharded_head":
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    per = B // world
    out = loss_of(model, data, slice(rank * per, (rank + 1) * per))
    out.loss.backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    losses = [None] * world
    dist.all_gather_object(losses, out.loss.item())

    install_kto_head(whole)
    out_whole = loss_of(whole, data, slice(0, B))
    out_whole.loss.backward()
    torch.save({"rank": rank, "world": world, "losses": losses, "loss": out_whole.loss.item(),
                "weight_type": type(model.lm_head.weight).__name__, "grads": grads,
                "grads_whole": {name: p.grad for name, p in whole.named_parameters()},
                "reference_loss": reference.metrics["loss"],
                "loss_scale": reference.scales["loss"], "grad_scale": reference.grad_scale},
               Path(args.out) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
