"""One rank of a small data-parallel job, launched by torchrun from tests/distributed.

    python -m torch.distributed.run --standalone --nproc-per-node 2 ranks_job.py OUT_DIR

Trains the same small model three ways under memprof.track on the gloo backend and saves one
profile per scenario and rank in OUT_DIR (track() adds the `.rank<R>` suffix):
- ddp: DistributedDataParallel + Adam;
- ddp_leak: the same, keeping every step's loss (and with it the step's graph) in a list;
- fsdp: FSDP2 (`fully_shard` on each Linear, then the root) + Adam.
LAYERS is what the tests compute the expected bytes from.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import memprof

LAYERS = ((48, 64), (64, 7))   # (in, out) of each Linear; 7 rows do not split evenly in 2
BATCH = 16
STEPS = 3


def build() -> torch.nn.Sequential:
    torch.manual_seed(0)   # the same initial weights on every rank
    (a, b), (c, d) = LAYERS
    return torch.nn.Sequential(torch.nn.Linear(a, b), torch.nn.ReLU(), torch.nn.Linear(c, d))


def train(model, opt, path: str, keep_losses: bool) -> None:
    gen = torch.Generator().manual_seed(dist.get_rank())   # each rank its own batches
    batches = [torch.randn(BATCH, LAYERS[0][0], generator=gen) for _ in range(STEPS)]
    history = []
    with memprof.track(model, opt, path=path):
        for x in batches:
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            if keep_losses:
                history.append(loss)   # planted leak: every step's graph stays alive
    dist.barrier()


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    for name, leak in (("ddp", False), ("ddp_leak", True)):
        model = DDP(build())
        opt = torch.optim.Adam(model.parameters())
        train(model, opt, os.path.join(out_dir, f"{name}.memprof"), leak)
    model = build()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters())
    train(model, opt, os.path.join(out_dir, "fsdp.memprof"), False)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
