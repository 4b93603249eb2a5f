"""One rank of an FSDP2 job whose reduce-scatter temporaries gloo frees on its worker thread.

    python -m torch.distributed.run --standalone --nproc-per-node 2 fsdp_comm_job.py OUT_DIR
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import memprof

STEPS = 8


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 7))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters())
    gen = torch.Generator().manual_seed(dist.get_rank())
    with memprof.track(model, opt, path=os.path.join(out_dir, "fsdp.memprof")):
        for _ in range(STEPS):
            model(torch.randn(16, 48, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
