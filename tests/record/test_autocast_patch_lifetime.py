"""memprof reads what autocast the first forward pass enters by wrapping
`torch.autocast.__enter__`; the wrapper stayed for the whole block, so every autocast entry
after that pass paid a Python frame of memprof's. It is needed for the first pass only: torch's
own is back after it (through the block's patch registry), and it is never set when autocast
is on already as the model is called."""
import pytest
import torch
from torch import nn
from torch.amp.autocast_mode import autocast as torch_autocast

import memprof

pytestmark = pytest.mark.usefixtures("collect_garbage_after")

WIDTH = 64


def _own():
    return torch_autocast.__dict__["__enter__"], torch_autocast.__dict__["__exit__"]


class HeadInBf16(nn.Module):
    def __init__(self, seen):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))
        self.head = nn.Linear(WIDTH, 10)
        self.seen, self.own = seen, _own()

    def forward(self, x):
        self.seen.append(_own() == self.own)
        h = self.body(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.head(h).float()


def test_autocast_is_torchs_own_again_after_the_first_forward_pass():
    own, seen = _own(), []
    torch.manual_seed(0)
    model = HeadInBf16(seen)
    opt = torch.optim.AdamW(model.parameters())
    with memprof.track(model, opt):
        for _ in range(3):
            model(torch.randn(16, WIDTH)).sum().backward()
            opt.step()
            opt.zero_grad()
            seen.append(_own() == own)
    # watched while the first pass ran, torch's own after it (and after the block)
    assert seen == [False, True, True, True, True, True]
    assert _own() == own


def test_autocast_on_at_the_call_is_never_wrapped():
    own, seen = _own(), []
    torch.manual_seed(0)
    model = HeadInBf16(seen)
    with memprof.track(model) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(16, WIDTH)).float().sum().backward()
    assert seen == [True] and _own() == own
    assert prof.run.records["inputs"]["autocast"] == {"cpu": "bfloat16"}


def test_a_first_pass_that_raises_puts_autocast_back():
    own = _own()

    class Raises(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Raises()
    with pytest.raises(RuntimeError, match="boom"):
        with memprof.track(model):
            model(torch.randn(2))
    assert _own() == own
