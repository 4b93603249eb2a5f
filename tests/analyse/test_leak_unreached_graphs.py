"""Retained graphs that no name reaches at the end of the block: the tensors outlived the
code that held them in a reference cycle through autograd's C++ nodes, which one collection
does not free (a reentrant checkpoint's ctx keeps the block whose list keeps its outputs).
They were one error row each, "held by a dict, list not reachable ...", with a fix for
carried state: 42 rows for three blocks' `history` lists."""
import gc
import weakref

import pytest
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


@pytest.mark.parametrize("collector", ["on", "off"])
def test_graphs_no_name_reaches_are_one_finding_held_by_a_list(collector):
    """The same cycle with the model dropped inside the block (no look while the loop ran:
    it runs in the block's own frame). With the collector off (as large jobs run) the graphs
    are kept: one finding for the unnamed graphs, and the holder is the blocks' lists - not
    the scan's own list and dict of the tensors it judges. With it on they are garbage that
    successive collections free (42 kept tensors, 28 after one collection, 14, then none):
    the check collects first and counts none of them."""
    gc.collect()
    torch.manual_seed(0)
    trunk = CheckpointedNet()      # not the tracked model: nothing of memprof's holds it
    head = torch.nn.Linear(CLASSES, 1)
    opt = torch.optim.SGD([*trunk.parameters(), *head.parameters()], lr=0.1)
    if collector == "off":
        gc.disable()
    try:
        with memprof.track(head, opt) as prof:
            kept = []   # the tensors with graphs kept by steps 0-6 (the last step's is current)
            for step in range(STEPS):
                opt.zero_grad()
                head(trunk(torch.randn(8, D))).sum().backward()
                opt.step()
                if step < STEPS - 1:
                    kept += [weakref.ref(t) for b in trunk.blocks for t in b.history[-2:]
                             if t.grad_fn is not None]
            del trunk, opt
        alive = sum(r() is not None for r in kept)     # after the block's check
    finally:
        gc.enable()
    found = [f for f in prof.findings if f.kind == "retained_graph"]
    if collector == "on":
        assert alive == 0 and found == [], (alive, [f.holder for f in found])
        return
    assert [f.holder for f in found] == \
        ["a list not reachable from the model or the tracked frame"], [f.holder for f in found]
    # the tensors with graphs of steps 0-6, each counted once
    assert alive == BLOCKS * 2 * (STEPS - 1)
    assert found[0].evidence["tensors"] == alive
    gc.collect()


class ExpKeepingOutputOnCtx(torch.autograd.Function):
    """PyTorch's docs warn against it: the output set on ctx instead of saved for backward."""
    @staticmethod
    def forward(ctx, x):
        out = x.exp()
        ctx.out = out
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.out


def test_an_output_kept_on_a_custom_functions_ctx_is_one_finding_with_its_fix():
    torch.manual_seed(0)
    lin = torch.nn.Linear(D, D)
    opt = torch.optim.SGD(lin.parameters(), lr=0.01)
    x = torch.randn(8, D)
    gc.collect()
    gc.disable()     # as large jobs do: the cycles are then never freed
    try:
        with memprof.track(lin, opt) as prof:
            for _ in range(STEPS):
                opt.zero_grad()
                ExpKeepingOutputOnCtx.apply(lin(x) * 0.01).sum().backward()
                opt.step()
    finally:
        gc.enable()
        gc.collect()
    found = [f for f in prof.findings if f.kind == "retained_graph"]
    assert len(found) == 1, [(f.holder, f.evidence["steps"]) for f in found]
    f = found[0]
    assert f.holder.startswith("ctx.out of ExpKeepingOutputOnCtx"), f.holder
    assert "ctx.save_for_backward(out)" in f.fix, f.fix
    assert f.evidence["steps"] == list(range(STEPS - 1))
    assert f.bytes == (STEPS - 1) * 8 * D * 4     # each step's output
