"""Submodules run in their scope through an instance-level `forward` memprof sets for the
block (a pair of module hooks sent every call down Module._call_impl's slow path): what a
user or a library sees of it, and the modules it must not be set on."""
import functools
import inspect
import sys

import pytest
import torch

import memprof


@pytest.fixture(autouse=True)
def _nothing_compiled_yet():
    """Scope forwards are used while torch.compile has compiled nothing in the process (an
    earlier test's compiled code would send these modules down the hook path)."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
    yield


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x, scale: float = 1.0):
        return torch.relu(self.fc(x)) * scale


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.block(x))


def test_submodules_are_attributed_and_look_like_themselves():
    model = Net()
    with memprof.track(model) as prof:
        assert "forward" in vars(model.block)             # the scope's forward, while tracked
        assert inspect.signature(model.block.forward) == \
            inspect.signature(Block.forward.__get__(model.block))
        assert model.block.forward.__name__ == "forward"
        assert not model.block._forward_pre_hooks      # no hook path for plain submodules
        out = model(torch.randn(16, 8))
    with memprof.track(auto_modules=True) as hooked:   # global module hooks name them
        model(torch.randn(16, 8))
    # the same attribution as through hooks: fc's output is freed by the ReLU (it saves its
    # result), the block keeps the ReLU's and its own output, head the logits
    assert prof.activations_by_module() == hooked.activations_by_module() == \
        {"block": 2 * 16 * 8 * 4 + 8, "head": 16 * 2 * 4}
    for m in model.modules():
        assert "forward" not in vars(m)
    assert out.shape == (16, 2)


def test_a_forward_that_raises_leaves_its_scope():
    """A submodule that raises (caught by its parent) is left: what the parent allocates
    next is the parent's, not the failed child's (the hooks' always_call did this)."""
    class Fails(torch.nn.Module):
        def forward(self, x):
            torch.empty(1000)
            raise ValueError("no")

    class Parent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.child = Fails()

        def forward(self, x):
            try:
                self.child(x)
            except ValueError:
                pass
            return x.repeat(100, 1)   # the parent's, held to the end

    model = Parent()
    with memprof.track(model) as prof:
        kept = model(torch.randn(4, 8))
    assert prof.activations_by_module() == {"Parent": kept.numel() * 4}


def test_instance_forwards_keep_the_hooks_and_are_kept():
    """A forward the instance already has (accelerate's hooks set one) is not replaced: the
    module runs in its scope through hooks, and its own forward is there after the block."""
    model = Net()
    original = model.block.forward

    def doubled(module, x):
        return original(x) * 2
    model.block.forward = functools.partial(doubled, model.block)
    mine = model.block.forward
    x = torch.randn(4, 8)
    expected = model(x)
    with memprof.track(model) as prof:
        assert model.block.forward is mine and model.block._forward_pre_hooks
        out = model(x)
    assert torch.equal(out, expected)
    assert model.block.forward is mine and not model.block._forward_pre_hooks
    assert prof.activations_by_module().get("block", 0) > 0


def test_a_forward_wrapped_again_during_the_block_passes_through_after_it():
    """A library that wraps the module's forward inside the block (accelerate's
    add_hook_to_module keeps `module.forward` and sets its own) keeps working after it; the
    scope's forward it wrapped no longer records, and a later block names the module."""
    model = Net()
    x = torch.randn(4, 8)
    with memprof.track(model):
        inner = model.block.forward

        def hooked(module, *args):
            return inner(*args) + 1
        model.block.forward = functools.partial(hooked, model.block)
        during = model(x)
    assert model.block.forward.func is hooked          # the library's, left in place
    assert torch.equal(model(x), during)
    with memprof.track(model) as again:
        model(x)
    acts = again.activations_by_module()
    assert acts.get("block", 0) > 0 and acts.get("head", 0) > 0


def test_script_and_graph_submodules_keep_the_hooks():
    """A GraphModule's forward is replaced by recompile(), a ScriptModule's is compiled:
    both run in their scope through hooks."""
    traced = torch.fx.symbolic_trace(Block())
    model = torch.nn.Sequential(traced, torch.nn.Linear(8, 2))
    with memprof.track(model) as prof:
        assert "forward" not in vars(model[0]) and model[0]._forward_pre_hooks
        assert "forward" in vars(model[1])
        model(torch.randn(4, 8))
    acts = prof.activations_by_module()
    assert acts.get("Sequential.0", 0) > 0 and acts.get("Sequential.1", 0) > 0


@pytest.mark.parametrize("save", ["state_dict", "module"])
def test_saving_inside_the_block_saves_no_scope(tmp_path, save):
    import io
    model = Net()
    x = torch.randn(2, 8)
    with memprof.track(model):
        model(x)
        buf = io.BytesIO()
        torch.save(model.state_dict() if save == "state_dict" else model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=save == "state_dict")
    if save == "module":
        assert not any("forward" in vars(m) for m in loaded.modules())
        assert torch.equal(loaded(x), model(x))
    else:
        assert set(loaded) == set(model.state_dict())


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def test_a_model_compiled_before_the_block_is_not_compiled_again():
    """Dynamo guards on a module's own `forward`: a scope forward would make a model
    compiled before the block compile again inside it (and after it, and in each block
    after that, up to the recompile limit). Once torch.compile was used, the hooks run."""
    model = Net()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 8)
    compiled(x)
    before = _graphs()
    for _ in range(3):
        with memprof.track(model) as prof:
            assert "forward" not in vars(model.block) and model.block._forward_pre_hooks
            compiled(x)
            compiled(x)
    compiled(x)
    assert _graphs() == before
    assert prof.meta["compiled"]


def test_torch_compile_inside_the_block_turns_scope_forwards_into_hooks():
    model = Net()
    x = torch.randn(4, 8)
    with memprof.track(model):
        model(x)
        assert "forward" in vars(model.block)
        compiled = torch.compile(model, backend="eager")
        assert "forward" not in vars(model.block) and model.block._forward_pre_hooks
        compiled(x)
    compiled(x)   # the hooks came off: compiled once more, as with hooks all along
    after = _graphs()
    for _ in range(3):
        with memprof.track(model):
            compiled(x)
    compiled(x)
    assert _graphs() == after
    for m in model.modules():
        assert "forward" not in vars(m) and not m._forward_pre_hooks
