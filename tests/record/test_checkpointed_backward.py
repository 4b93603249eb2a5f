"""A user's own activation checkpointing: the backward's memory belongs to the modules whose
forward built its nodes. With `use_reentrant=True` the recompute runs inside the backward and
a nested backward runs its nodes; their forward ops were not noted (ops in backward were
skipped), so about half of the backward's memory had no module ("<outside modules>")."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import memprof

PHASE_BACKWARD = 2


class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, 4 * d)
        self.fc2 = torch.nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(torch.nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(32) for _ in range(3))
        self.reentrant = reentrant

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=self.reentrant)
        return x


@pytest.mark.parametrize("reentrant", [True, False])
def test_backward_memory_of_checkpointed_blocks_is_theirs(reentrant):
    torch.manual_seed(0)
    model = Net(reentrant)
    plain = Net(reentrant)
    plain.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    batches = [torch.randn(8, 32, requires_grad=True) for _ in range(2)]
    for x in batches:
        plain(x).sum().backward()
        plain_opt.step()
        plain_opt.zero_grad()
    with memprof.track(model, opt) as prof:
        for x in batches:
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
    mem = prof.memory
    backward = (mem["phase"] == PHASE_BACKWARD) & (mem["size"] > 0)
    total = int(mem["size"][backward].sum())
    outside = int(mem["size"][backward & (prof.event_module < 0)].sum())
    assert total > 100_000 and outside <= 0.02 * total, (outside, total)
    names = {prof.module_name(int(m)) for m in prof.event_module[backward] if m >= 0}
    assert {"blocks.0.fc1", "blocks.2.fc2"} <= names, names
    for a, b in zip(model.parameters(), plain.parameters()):   # tracking changed nothing
        assert torch.equal(a, b)
