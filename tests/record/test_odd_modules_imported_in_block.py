"""At a block's end memprof puts torch's functions back in the modules first imported while it
ran (record.torch_tables.put_back), reading their live namespaces. A module another thread
was importing meanwhile (its dict changing size as it was read), or an object in sys.modules
whose namespace cannot be read, raised out of the patches' restore: the rest of the block's
uninstall was skipped, torch's functions left wrapped. What cannot be put back is inert (the
wrappers pass through once their block ended): such a module is now passed over."""
import sys
import types

import pytest
import torch

import memprof

pytestmark = pytest.mark.usefixtures("collect_garbage_after")


class _Changing(dict):
    """A namespace another thread adds to while it is read."""

    def __iter__(self):
        raise RuntimeError("dictionary changed size during iteration")

    def items(self):
        raise RuntimeError("dictionary changed size during iteration")


class _NoNamespace:
    @property
    def __dict__(self):
        raise RuntimeError("namespace not readable")


def test_a_module_that_cannot_be_read_does_not_break_the_blocks_end():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    real = torch.Tensor.backward, torch.optim.Optimizer.__init__
    names = ("torch_odd_importing", "odd_unreadable")
    try:
        with memprof.track(model, health=True, analyses=()) as prof:
            for _ in range(2):
                odd = types.ModuleType(names[0])   # (torch's name: its dicts are read too)
                odd.table = _Changing(x=1)
                sys.modules[names[0]] = odd
                sys.modules[names[1]] = _NoNamespace()
                model(torch.randn(3, 4)).sum().backward()
                opt.step()
                opt.zero_grad()
        assert (torch.Tensor.backward, torch.optim.Optimizer.__init__) == real
        assert len(prof.profile.steps) == 2
    finally:
        for name in names:
            sys.modules.pop(name, None)
