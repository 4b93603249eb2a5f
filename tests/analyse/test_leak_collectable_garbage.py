"""Graphs that only cyclic garbage keeps at the block's end: the next garbage collection frees
them, so nothing holds them. The end-of-block check walked every object the collector still
tracked, and a self-referencing object holding a non-detached output (dropped, unreachable
from any frame) read as "N tensors kept by a retained graph" held by "a Keeper not reachable
from the model" - counted with the real leak's tensors in the user's reading (42 kept tensors
before a collection, 28 after one, in tests/analyse/test_leak_unreached_graphs.py)."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import memprof

pytestmark = pytest.mark.usefixtures("collect_garbage_after")

D, CLASSES, STEPS, GARBAGE_STEPS = 16, 4, 6, 3


class Keeper:
    """An object in a reference cycle with itself, holding a model's output with its graph."""

    def __init__(self, out):
        self.me = self
        self.out = out


def _short(path: str) -> str:
    """'f.<locals>.losses[2]' -> 'losses[2]'."""
    return path.split(".<locals>.")[-1]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, CLASSES))


def test_garbage_a_collection_frees_is_not_counted_and_a_real_leak_still_is():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    gc.collect()
    with memprof.track(model, opt) as prof:
        losses, keepers = [], []
        for step in range(STEPS):
            opt.zero_grad()
            out = model(torch.randn(8, D, generator=g))
            loss = F.cross_entropy(out, torch.randint(0, CLASSES, (8,), generator=g))
            loss.backward()
            opt.step()
            losses.append(loss)                 # the real leak: each step's loss, not detached
            if step < GARBAGE_STEPS:
                keepers.append(Keeper(out))
        gc.collect()      # the keepers survive it (still named): the oldest generation ...
        outs = [weakref.ref(k.out) for k in keepers]
        del keepers, out, loss    # ... which only a full collection frees: garbage now
    found = [f for f in prof.findings if f.kind in ("retained_graph", "unused_graph")]
    assert [_short(f.holder) for f in found] == ["losses"], \
        [(f.holder, f.message) for f in found]
    f = found[0]
    assert f.kind == "retained_graph"
    # the losses of steps 0 .. STEPS-2 (the last is the current step's), and nothing else
    assert [_short(p) for p in f.evidence["paths"]] == \
        [f"losses[{i}]" for i in range(STEPS - 1)], \
        f.evidence["paths"]
    assert f.evidence["tensors"] == STEPS - 1
    assert not any("Keeper" in (x.holder or "") + x.message for x in prof.findings)
    assert all(r() is None for r in outs), "the garbage outlived the block's end check"
