"""One rank of a small gloo job, launched by torchrun from tests/distributed: the collectives
and optimizers that memprof counted wrongly, each in its own track() block.

    python -m torch.distributed.run --standalone --nproc-per-node 2 collectives_job.py OUT_DIR

Saves in OUT_DIR, per rank (track() adds `.rank<R>`):
- zero: DDP + ZeroRedundancyOptimizer(Adam), track(model) (every optimizer watched: ZeRO
  steps its local Adam inside its own step);
- zero_given: the same with track(model, optimizer=zero);
- hand: gradients averaged by hand (the "Writing Distributed Applications" tutorial) and
  the parameters updated by hand, no optimizer; the loss all-reduced for logging;
- direct: all_gather_into_tensor, reduce_scatter_tensor and the list form of all_gather,
  called directly, then a forward and backward;
- overlap: a collective before the forward while rank 1 prepares its batch slowly (rank 0
  waits in it: the HF Trainer's token-count gather);
- export.rank<R>.html / .json: prof.export() of the overlap block in each rank;
and facts.rank<R>.json: what the tests compare with, read off the real objects.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

import memprof

STEPS = 3
CHUNK = 256            # elements each rank contributes to the direct all-gathers
SLOW_BATCH_S = 0.03    # rank 1's batch preparation in the overlap scenario


def build() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def batch(rank: int) -> torch.Tensor:
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))


def zero(out: str, name: str, given: bool, rank: int) -> int:
    """The local optimizer's state bytes after the block (what this rank holds)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    model = torch.nn.parallel.DistributedDataParallel(build())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam)
    with memprof.track(model, opt if given else None, path=os.path.join(out, name)):
        for _ in range(STEPS):
            model(batch(rank)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    return sum(t.numel() * t.element_size() for s in opt.optim.state.values()
               for t in s.values() if torch.is_tensor(t))


def hand(out: str, rank: int, world: int) -> None:
    model = build()
    with memprof.track(model, path=os.path.join(out, "hand.memprof")):
        for _ in range(STEPS):
            loss = model(batch(rank)).square().mean()
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
            logged = loss.detach().clone()
            dist.all_reduce(logged)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.grad, alpha=-0.1)
                    p.grad = None


def direct(out: str, world: int) -> None:
    lin = torch.nn.Linear(4, 4)
    with memprof.track(lin, path=os.path.join(out, "direct.memprof")):
        for _ in range(STEPS):
            mine = torch.ones(CHUNK)
            dist.all_gather_into_tensor(torch.empty(CHUNK * world), mine)
            dist.reduce_scatter_tensor(torch.empty(CHUNK), torch.ones(CHUNK * world))
            dist.all_gather([torch.empty(CHUNK) for _ in range(world)], mine)
            lin(torch.randn(2, 4)).sum().backward()


def overlap(out: str, rank: int) -> memprof.Profile:
    model = torch.nn.parallel.DistributedDataParallel(build())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with memprof.track(model, opt, path=os.path.join(out, "overlap.memprof")) as prof:
        for _ in range(STEPS + 2):
            x = batch(rank)
            if rank == 1:
                time.sleep(SLOW_BATCH_S)
            n = torch.tensor([x.shape[0]])
            dist.all_reduce(n)            # the global batch size, before the forward
            (model(x).square().sum() / n).backward()
            opt.step()
            opt.zero_grad()
    return prof


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    facts = {"params": len(list(build().parameters())), "steps": STEPS, "chunk": CHUNK}
    zero(out, "zero.memprof", False, rank)
    facts["zero_local_state_bytes"] = zero(out, "zero_given.memprof", True, rank)
    hand(out, rank, world)
    direct(out, world)
    prof = overlap(out, rank)
    facts["exports"] = [prof.export(os.path.join(out, f"export.{ext}"))
                        for ext in ("html", "json")]
    with open(os.path.join(out, f"facts.rank{rank}.json"), "w") as f:
        json.dump(facts, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
