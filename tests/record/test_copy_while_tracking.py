"""A tracked model can be copied and saved while tracking: an EMA copy (`copy.deepcopy`) or
`torch.save(model)` after the first forward failed under `memprof run` ("cannot pickle
'_thread.lock' object": a root hook was a bound method of the scope), and inside
`track(model)` the same way (its submodule hooks are closures). Auto mode (`memprof run`) puts
no hook in the model at all; explicit mode's hooks are left out of what a copy or a save takes
(the user's own hooks are kept)."""
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
        if auto:
            assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
        assert torch.equal(back(x), model(x))
    # nothing of memprof's in the copies: a saved one loads where memprof is not, and they
    # outlive the block as plain modules
    for copied in (ema, back):
        assert not any(getattr(m, table) for m in copied.modules() for table in _TABLES)
        assert not any("forward" in vars(m) for m in copied.modules())
        assert torch.equal(copied(x), model(x))


_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
           "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _double_output(module, args, output):
    return output * 2


def test_copies_keep_the_users_hooks():
    """Only memprof's hooks are left out: a hook of the user's (registered before and after
    the block's own) is in the copy and the saved model, and still changes their output."""
    model = _model()
    model[0].register_forward_hook(_double_output)
    x = torch.randn(3, 8)
    with memprof.track(model):
        model[2].register_forward_hook(_double_output)
        expected = model(x)
        ema = copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    for copied in (ema, back):
        assert [len(m._forward_hooks) for m in copied] == [1, 0, 1]
        assert torch.equal(copied(x), expected)
    assert torch.nn.Module.__getstate__ is _MODULE_GETSTATE   # restored


_MODULE_GETSTATE = torch.nn.Module.__getstate__


def test_auto_mode_leaves_no_global_hook_behind():
    """The global forward hook is registered with_kwargs; its handle's remove() leaves that
    entry in torch's table, and torch went on seeing a global hook after the block (every
    torch.compile of the process warned of one)."""
    from torch.nn.modules import module as nn_module
    model = _model()
    with memprof.track(auto_modules=True):
        model(torch.randn(2, 8))
    assert not nn_module._has_any_global_hook()


class _OwnState(torch.nn.Sequential):
    """A module class with its own __getstate__ that does not call Module's (LightningModule
    has one: Lightning's EMA and SWA callbacks deepcopy it)."""

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_trainer"] = None
        return state


def test_a_class_with_its_own_getstate_copies_and_saves_while_tracked():
    model = _OwnState(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x = torch.randn(3, 8)
    with memprof.track(model):
        model(x).sum().backward()
        ema = copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
    assert _OwnState.__getstate__ is _OWN_GETSTATE   # restored
    buf.seek(0)
    for copied in (ema, torch.load(buf, weights_only=False)):
        assert not any(getattr(m, table) for m in copied.modules() for table in _TABLES)
        assert not any("forward" in vars(m) for m in copied.modules())
        assert torch.equal(copied(x), model(x))


_OWN_GETSTATE = _OwnState.__getstate__


class _LiveState(torch.nn.Module):
    """A hand-written __getstate__ that returns the live __dict__ itself."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 64)

    def forward(self, x):
        return torch.relu(self.fc(x))

    def __getstate__(self):
        return self.__dict__


def test_a_save_does_not_take_the_hooks_off_a_module_whose_state_is_its_dict():
    """Leaving memprof's hooks out of such a state edited the live module: after a save
    inside the block the module was no longer attributed."""
    model = torch.nn.Sequential(_LiveState(), torch.nn.Linear(64, 2))
    x = torch.randn(4, 8)
    with memprof.track(model) as plain:
        model(x)
    with memprof.track(model) as saved:
        torch.save(model, io.BytesIO())
        model(x)
    assert saved.activations_by_module() == plain.activations_by_module()
    assert "Sequential.0" in plain.activations_by_module()
