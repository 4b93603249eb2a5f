"""One rank of a 2-rank gloo DDP job started by torch.multiprocessing.spawn (the merged
report's end-to-end test): rank r trains on batches of 16 * (r + 1) samples under
memprof.track and keeps every step's output (and its graph) in a list - the same planted
leak on every rank, with bytes that differ by rank."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

import memprof

STEPS = 3


def worker(rank: int, world: int, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(rank)
        kept_outputs = []
        with memprof.track(model, opt, path=os.path.join(out_dir, "job.memprof")):
            for _ in range(STEPS):
                out = model(torch.randn(16 * (rank + 1), 32, generator=gen))
                out.square().mean().backward()
                opt.step()
                opt.zero_grad()
                kept_outputs.append(out)      # the planted leak
        dist.barrier()
    finally:
        dist.destroy_process_group()
