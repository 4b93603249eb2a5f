"""Retained graphs that no name reaches at the end of the block: the tensors outlived the
code that held them in a reference cycle through autograd's C++ nodes, which Python's garbage
collector cannot see through (a reentrant checkpoint's ctx keeps the block whose list keeps
its outputs). They were one error row each, "held by a dict, list not reachable ...", with a
fix for carried state: 42 rows for three blocks' `history` lists."""
import gc

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import memprof

D, CLASSES, STEPS, BLOCKS = 16, 4, 8, 3


class KeepingBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(D, D)
        self.history = []

    def forward(self, x):
        y = torch.relu(self.fc(x))
        self.history.append(y)     # the leak: every step's output, with its graph
        return y


class CheckpointedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(KeepingBlock() for _ in range(BLOCKS))
        self.head = torch.nn.Linear(D, CLASSES)

    def forward(self, x):
        x = x.requires_grad_()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=True)
        return self.head(x)


def _train_checkpointed():
    """A script's main(): the model is its local, gone (but for the cycle) when it returns."""
    torch.manual_seed(0)
    model = CheckpointedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(8, D, generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, CLASSES, (8,), generator=g)).backward()
        opt.step()


def test_a_reentrant_checkpoints_kept_outputs_are_named_per_block_once():
    gc.collect()
    with memprof.track() as prof:     # as `memprof run` runs a script's main()
        _train_checkpointed()
    found = [f for f in prof.findings if f.kind == "retained_graph"]
    assert sorted(f.holder for f in found) == \
        [f"_train_checkpointed.<locals>.model.blocks.{i}.history" for i in range(BLOCKS)], [f.holder for f in found]
    assert all("keep `.detach()`ed tensors" in f.fix for f in found)
    # two kept tensors a step per block (the forward's, the recompute's), steps 0-6
    assert all(f.evidence["steps"] == list(range(STEPS - 1)) for f in found)
    assert all(f.evidence["tensors"] == 2 * (STEPS - 1) for f in found)
    gc.collect()

