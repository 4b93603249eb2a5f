"""One rank of a 2-rank gloo job whose optimizers hold a layer the forward never calls,
launched by torchrun from tests/distributed:

    python -m torch.distributed.run --standalone --nproc-per-node 2 gradless_job.py OUT_DIR

Saves one profile per scenario and rank in OUT_DIR (track() adds `.rank<R>`):
- accum: DDP + Adam, two micro-batches a step, the first under no_sync() (every layer used);
- zero: DDP(find_unused_parameters=True) + ZeroRedundancyOptimizer(Adam): each rank's local
  optimizer holds the state of its shard only;
- fsdp: FSDP2 (`fully_shard` on each Linear, then the root) + Adam: DTensor parameters, each
  rank holding half of every weight's rows.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import memprof

STEPS = 4
SPARE = (64, 8)   # (in, out) of the layer never called: 8 rows split evenly in 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 8)
        self.spare = nn.Linear(*SPARE)

    def forward(self, x, spare: bool = False):
        h = torch.relu(self.a(x))
        return self.b(h) + (self.spare(h) if spare else 0)


def train(model, opt, path: str, micro: int = 1) -> None:
    gen = torch.Generator().manual_seed(dist.get_rank())   # each rank its own batches
    with memprof.track(model, opt, path=path):
        for _ in range(STEPS):
            for i in range(micro):
                x = torch.randn(8, 32, generator=gen)
                if i < micro - 1:
                    with model.no_sync():
                        model(x, spare=True).square().mean().backward()
                else:
                    model(x, spare=micro > 1).square().mean().backward()
            opt.step()
            opt.zero_grad()
    dist.barrier()


def main(out: str) -> None:
    dist.init_process_group("gloo")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = DDP(Net())
    train(model, torch.optim.Adam(model.parameters()), os.path.join(out, "accum.memprof"), 2)
    torch.manual_seed(0)
    model = DDP(Net(), find_unused_parameters=True)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam)
    train(model, opt, os.path.join(out, "zero.memprof"))
    held = [p for g in opt.optim.param_groups for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    with open(os.path.join(out, f"zero.rank{dist.get_rank()}.held"), "w") as f:
        f.write("\n".join(names[id(p)] for p in held))
    torch.manual_seed(0)
    model = Net()
    for layer in (model.a, model.b, model.spare):
        fully_shard(layer)
    fully_shard(model)
    train(model, torch.optim.Adam(model.parameters()), os.path.join(out, "fsdp.memprof"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
