"""Parameters an optimizer updates that never got a gradient: blocks wrapped in
`torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True)` whose input does not require
grad (the first block after a frozen embedding, or every block of a model fed raw features)
pass no gradient to their weights - the model's body never trains - and memprof said nothing:
the report showed the gradients of the head only, with no finding."""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import memprof

D = 128


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x):
        return x + self.f(x)


class Net(nn.Module):
    def __init__(self, reentrant: bool, spare: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(D, 10)
        self.spare = nn.Linear(D, 2) if spare else None   # built, never called
        self.reentrant = reentrant

    def forward(self, x):
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=self.reentrant)
        return self.head(x)


def _train(model, opt, steps=3):
    torch.manual_seed(1)
    x, y = torch.randn(16, D), torch.randint(0, 10, (16,))   # raw inputs: no grad
    with memprof.track(model, opt) as prof:
        for _ in range(steps):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return prof


def _nbytes(params):
    return sum(p.numel() * p.element_size() for p in params)


def test_reentrant_checkpoints_with_inputs_that_need_no_grad_are_a_finding(tmp_path):
    torch.manual_seed(0)
    model = Net(reentrant=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prof = _train(model, opt)
    assert all(p.grad is None and not opt.state.get(p) for p in model.blocks.parameters())
    found = [f for f in memprof.findings(prof) if f.kind == "parameters_without_gradients"]
    assert len(found) == 1, memprof.findings(prof, "info")
    f = found[0]
    assert f.severity == "warning"
    assert f.bytes == _nbytes(model.blocks.parameters())
    assert f.evidence["parameters"] == 12 and f.evidence["steps"] == 3
    assert "blocks.0.f.0.weight" in f.message and "use_reentrant" in f.fix
    loaded = memprof.load(prof.save(str(tmp_path / "reentrant.memprof")))
    assert "parameters_without_gradients" in [g.kind for g in memprof.findings(loaded)]


def test_non_reentrant_checkpoints_train_every_block():
    torch.manual_seed(0)
    model = Net(reentrant=False)
    prof = _train(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert not memprof.findings(prof, "info")


def test_a_small_unused_layer_is_said_not_flagged_and_frozen_or_stateless_ones_are_not():
    """A layer the forward never calls (1% of the weights): info. Frozen parameters handed to
    the optimizer (AdamW(model.parameters()) over a frozen part) and an optimizer that keeps
    no per-parameter state (plain SGD: nothing tells) say nothing."""
    torch.manual_seed(0)
    model = Net(reentrant=False, spare=True)
    prof = _train(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert not memprof.findings(prof)
    info = [f for f in memprof.findings(prof, "info")
            if f.kind == "parameters_without_gradients"]
    assert len(info) == 1 and info[0].bytes == _nbytes(model.spare.parameters())
    assert "spare.weight" in info[0].message
    model = Net(reentrant=False)
    model.blocks[0].requires_grad_(False)
    assert not memprof.findings(_train(model, torch.optim.AdamW(model.parameters())), "info")
    model = Net(reentrant=True)
    assert not memprof.findings(_train(model, torch.optim.SGD(model.parameters(), lr=0.1)),
                                "info")
