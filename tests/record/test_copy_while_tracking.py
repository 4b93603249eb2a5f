"""A tracked model can be copied and saved while tracking: an EMA copy (`copy.deepcopy`) or
`torch.save(model)` after the first forward failed under `memprof run` ("cannot pickle
'_thread.lock' object": a root hook was a bound method of the scope), and a deepcopy inside
`track(model)` the same way (the scope copies as itself). Auto mode (`memprof run`) puts no
hook in the model at all."""
import copy
import io

import pytest
import torch

import memprof


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


@pytest.mark.parametrize("auto", [True, False])
def test_deepcopy_and_save_after_a_forward(auto):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (memprof.track(auto_modules=True) if auto else memprof.track(model, opt)):
        for _ in range(2):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        ema = copy.deepcopy(model)               # an EMA / target network
        x = torch.randn(3, 8)
        assert torch.equal(ema(x), model(x))
        if auto:   # explicit mode's submodule hooks are closures: pickling them still fails
            # nothing of memprof's in the model: a saved one loads where memprof is not
            assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
            buf = io.BytesIO()
            torch.save(model, buf)
            buf.seek(0)
            back = torch.load(buf, weights_only=False)
            assert torch.equal(back(x), model(x))
    # the copies outlive the block and run as plain modules
    assert torch.equal(ema(x), model(x))


def test_auto_mode_leaves_no_global_hook_behind():
    """The global forward hook is registered with_kwargs; its handle's remove() leaves that
    entry in torch's table, and torch went on seeing a global hook after the block (every
    torch.compile of the process warned of one)."""
    from torch.nn.modules import module as nn_module
    model = _model()
    with memprof.track(auto_modules=True):
        model(torch.randn(2, 8))
    assert not nn_module._has_any_global_hook()
