"""Which module runs: Module.__call__ replaced on the class for the block
(record/module_call.py; no hook on any module, the model's calls are its passes), and nothing
of the module's changed. An instance-level `forward` set for the block was tried before and
taken out again: code that copies a module's `__dict__` (DataParallel's replicas,
accelerate's regional compile) copied it too, and the copy computed with the original's
parameters; a `@staticmethod` forward got the module as its input; a class-level forward
patched inside the block was ignored. These tests keep those cases right."""
import functools

import pytest
import torch

import memprof
from memprof.record import module_call


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


def _train(model, opt, batch: int, steps: int = 3) -> None:
    for _ in range(steps):
        model(torch.randn(batch, 8)).sum().backward()
        opt.step()
        opt.zero_grad()


def _train_beside(work, model, opt) -> None:
    """_train(model, opt, 16, steps=4) while another thread runs work() again and again."""
    import threading
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            work()
    thread = threading.Thread(target=loop)
    thread.start()
    try:
        _train(model, opt, 16, steps=4)
    finally:
        stop.set()
        thread.join()


def test_submodules_are_attributed_and_stay_themselves():
    model = Net()
    with memprof.track(model) as prof:
        assert "forward" not in vars(model.block)
        assert model.block.forward.__func__ is Block.forward
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


@pytest.mark.parametrize("auto", [False, True], ids=["track(model)", "auto_modules"])
def test_a_forward_that_raises_leaves_its_scope(auto):
    """A submodule that raised, its parent caught it: what the parent allocates next is the
    parent's. (Auto mode's global hook, before module_call, was called (module, args, output)
    by torch after a forward that raised: it was refused there, the failed child stayed on
    the stack, and the parent's next allocation was the child's.)"""
    class Fails(torch.nn.Module):
        def forward(self, x):
            raise ValueError("no")

    class Parent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.child = Fails()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            try:
                self.child(x)
            except ValueError:
                pass
            return self.fc(x).repeat(100, 1)

    model = Parent()
    with (memprof.track(auto_modules=True) if auto else memprof.track(model)) as prof:
        kept = model(torch.randn(4, 8))
    acts = prof.activations_by_module()
    assert "child" not in acts and acts.get("Parent", 0) >= kept.numel() * 4


def test_instance_forwards_are_scoped_and_kept():
    """A forward the instance already has (accelerate's hooks set one) is not replaced: the
    module runs in its scope, and its own forward is there after the block."""
    model = Net()
    original = model.block.forward

    def doubled(module, x):
        return original(x) * 2
    model.block.forward = functools.partial(doubled, model.block)
    mine = model.block.forward
    x = torch.randn(4, 8)
    expected = model(x)
    with memprof.track(model) as prof:
        assert model.block.forward is mine and not model.block._forward_pre_hooks
        out = model(x)
    assert torch.equal(out, expected)
    assert model.block.forward is mine and not model.block._forward_pre_hooks
    assert prof.activations_by_module().get("block", 0) > 0


def test_a_forward_wrapped_during_the_block_keeps_working_after_it():
    """A library that wraps the module's forward inside the block (accelerate's
    add_hook_to_module keeps `module.forward` and sets its own) keeps working after it, and a
    later block names the module."""
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


def test_graph_submodules_are_scoped():
    """A GraphModule (whose forward recompile() replaces) runs in its scope like any
    module."""
    traced = torch.fx.symbolic_trace(Block())
    model = torch.nn.Sequential(traced, torch.nn.Linear(8, 2))
    with memprof.track(model) as prof:
        model(torch.randn(4, 8))
    acts = prof.activations_by_module()
    assert acts.get("Sequential.0", 0) > 0 and acts.get("Sequential.1", 0) > 0


@pytest.mark.parametrize("save", ["state_dict", "module"])
def test_saving_inside_the_block_saves_no_hooks(tmp_path, save):
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
    """Dynamo guards on a module's own attributes: a `forward` set on the instance made a
    model compiled before the block compile again in it, and in every block after it."""
    model = Net()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 8)
    compiled(x)
    before = _graphs()
    for _ in range(3):
        with memprof.track(model) as prof:
            compiled(x)
            compiled(x)
    compiled(x)
    assert _graphs() == before
    assert prof.meta["compiled"]


def test_a_model_compiled_inside_the_block_compiles_again_once_after_it():
    model = Net()
    x = torch.randn(4, 8)
    with memprof.track(model):
        model(x)
        compiled = torch.compile(model, backend="eager")
        compiled(x)
    compiled(x)   # the hooks came off: compiled once more
    after = _graphs()
    for _ in range(3):
        with memprof.track(model):
            compiled(x)
    compiled(x)
    assert _graphs() == after
    for m in model.modules():
        assert "forward" not in vars(m) and not m._forward_pre_hooks


class StaticSiLU(torch.nn.Module):
    """YOLOv5's activations: a forward that is a staticmethod."""
    @staticmethod
    def forward(x):
        return x * torch.sigmoid(x)


def test_a_staticmethod_forward_is_called_as_one():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), StaticSiLU(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    expected = model(x)
    with memprof.track(model) as prof:
        assert torch.equal(model(x), expected)
    assert prof.activations_by_module().get("Sequential.1", 0) > 0


def test_a_copy_of_a_modules_dict_computes_with_its_own_parameters():
    """DataParallel's replicas are made by copying each module's __dict__ and then giving the
    copy its own parameters: the copy must compute with those, not the original's."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    with memprof.track(model):
        replicas = {m: m._replicate_for_data_parallel() for m in model.modules()}
        for m, r in replicas.items():
            for k, sub in m._modules.items():
                r._modules[k] = replicas[sub]
            for k, p in m._parameters.items():
                setattr(r, k, torch.zeros_like(p) if m is model[0] else p.detach().clone())
        out = replicas[model](x)
    assert torch.allclose(out, model[2].bias.expand(3, 2))   # layer 0 zero: relu(0) = 0


def test_a_class_forward_patched_inside_the_block_is_the_one_that_runs():
    model = Net()
    x = torch.randn(4, 8)
    original = Block.forward
    try:
        with memprof.track(model):
            Block.forward = lambda self, x, scale=1.0: original(self, x, scale) * 2
            doubled = model.block(x)
        assert torch.equal(doubled, model.block(x))
    finally:
        Block.forward = original


def test_a_module_replaced_inside_the_block_is_freed_there():
    """A new classifier head inside the block: the old one (1 MiB of weight, its gradient)
    is freed at once, as untracked. The scope's list of modules and the hand-written-update
    check held it, and its parameters, until the block ended."""
    import gc
    import weakref

    model = Net()
    model.head = torch.nn.Linear(8, 32768)
    x = torch.randn(2, 8)
    with memprof.track(model) as prof:
        model(x).sum().backward()
        old_weight = weakref.ref(model.head.weight)
        model.head = torch.nn.Linear(8, 2)
        gc.collect()
        assert old_weight() is None
        model(x).sum().backward()
    assert prof.breakdown("category", at="end")["gradients"] == \
        sum(p.numel() * 4 for p in model.parameters())


def test_a_new_module_at_a_freed_ones_address_is_not_named_after_it():
    """Freed modules are not held (see above), so their address can be reused: a new module
    there took the freed one's name. The scope forgets a freed module's address at once."""
    import gc
    from memprof.record.session import active_session

    class Big(torch.nn.Module):
        def forward(self, x):
            return x.repeat(1000, 1)

    model = Net()
    x = torch.randn(1, 8)
    with memprof.track(auto_modules=True) as prof:
        model(x)
        scope = active_session().scope
        address = id(model.head)
        assert address in scope._auto_ids
        model.head = None
        gc.collect()
        assert address not in scope._auto_ids
        candidates = [Big() for _ in range(200)]   # one of them may land at that address
        outputs = [m(torch.randn(1, 1000)) for m in candidates if id(m) == address]
    if outputs:   # the reuse happened: its memory is not the freed head's
        assert prof.breakdown("module", at="end").get("head", 0) < 4_000_000


def test_a_tracked_submodule_can_be_scripted_inside_the_block():
    """torch.jit.script of a module of the tracked model, inside the block: TorchScript
    refused memprof's Python hooks on it ("Hook '_pop_hook' ... expected exactly 3 inputs")."""
    model = Net()
    x = torch.randn(4, 8)
    with memprof.track(model) as prof:
        scripted = torch.jit.script(model.block)
        assert torch.equal(scripted(x), model.block(x))
        model(x).sum().backward()
    assert prof.activations_by_module().get("block", 0) > 0


def test_module_call_is_the_classs_again_after_the_block_and_hooks_are_untouched():
    before = torch.nn.Module.__call__
    model = Net()
    with memprof.track(model):
        assert torch.nn.Module.__call__ is not before
        assert not any(m._forward_pre_hooks or m._forward_hooks
                       for m in model.modules() if m is not model)
        model(torch.randn(4, 8))
    assert torch.nn.Module.__call__ is before
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_a_user_hook_of_a_submodule_runs_in_its_scope():
    """What a submodule's own pre-hook allocates (a library's hook: an unshard, a cast) is the
    submodule's: the scope is around the whole call, its hooks included (memprof's own
    pre-hook ran after those registered before the block, in the parent's scope)."""
    model = Net()
    kept = []
    model.head.register_forward_pre_hook(lambda m, args: kept.append(args[0].repeat(64, 1)))
    with memprof.track(model) as prof:
        model(torch.randn(4, 8))
    assert prof.activations_by_module().get("head", 0) >= kept[0].nbytes


def test_a_function_compiled_fullgraph_over_tracked_submodules_does_not_break():
    """A compiled function that calls modules of the tracked model: the scoped call steps
    aside while dynamo traces (fullgraph: a break would raise), the report says some memory
    was in compiled code, and a second block compiles nothing again."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = Net()

    @torch.compile(backend="eager", fullgraph=True)
    def body(x):
        return model.block(x)

    for _ in range(2):
        with memprof.track(model) as prof:
            model.head(body(torch.randn(8, 8))).sum().backward()
        assert prof.meta["compiled"]
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1


def test_a_keyword_argument_named_module_reaches_the_callee():
    class Router(torch.nn.Module):
        def forward(self, x, module=0):
            return x * module

    model = torch.nn.Sequential()
    model.add_module("router", Router())
    x = torch.randn(4, 8)
    with memprof.track(model):
        assert torch.equal(model.router(x, module=2), x * 2)


def test_modules_compiled_inside_blocks_each_keep_their_own_recompile_budget():
    """torch.compile(module) inside a block binds the module's __call__ - memprof's, then -
    as the frame to compile: every module so compiled shared one budget of 8 entries, and
    past it ran uncompiled for good. Dynamo skips that frame and compiles the module's own."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()

    def layer(i):   # a class of its own, with a forward of its own (its own code object)
        namespace = {"nn": torch.nn}
        exec(f"class Layer{i}(nn.Module):\n"
             f"    def __init__(self):\n"
             f"        super().__init__()\n"
             f"        self.fc = nn.Linear(4, 4)\n"
             f"    def forward(self, x):\n"
             f"        return self.fc(x).relu() * {i + 1}\n", namespace)
        return namespace[f"Layer{i}"]()

    graphs = []
    for block in range(3):
        model = torch.nn.Sequential(*[layer(4 * block + i) for i in range(4)])
        counters.clear()
        with memprof.track(model):
            y = torch.randn(2, 4)
            for sub in model:
                y = torch.compile(sub, backend="eager")(y)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [4, 4, 4]


def test_a_call_wrapper_left_over_ours_does_not_recurse():
    """Code that wraps Module.__call__ inside a block and keeps it (a library imported there):
    its wrapper calls memprof's; the next block used it as the original of its own and every
    module call recursed, for the rest of the process."""
    model, x = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), torch.randn(4, 8)
    before = torch.nn.Module.__call__
    try:
        with memprof.track(model):
            inner = torch.nn.Module.__call__

            def library_call(self, *a, **k):
                return inner(self, *a, **k)
            torch.nn.Module.__call__ = library_call
            model(x)
        model(x)
        with memprof.track(model) as prof:
            model(x)
        model(x)
        assert prof.activations_by_module().get("Sequential.1", 0) > 0   # the ReLU's output
    finally:
        torch.nn.Module.__call__ = before


def test_a_freed_submodules_address_does_not_scope_a_new_module():
    import gc

    class Big(torch.nn.Module):
        def forward(self, x):
            return x.repeat(1000, 1)

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
    with memprof.track(model):
        head = model[2]
        address = id(head)
        assert module_call.scoped_ids.get(address) is not None
        model[2] = torch.nn.Identity()
        del head
        gc.collect()
        assert address not in module_call.scoped_ids


def test_a_model_compiled_and_run_before_the_block_is_reported_as_compiled():
    torch._dynamo.reset()
    model = torch.compile(Net(), backend="eager")
    model(torch.randn(4, 8))
    with memprof.track(model) as prof:
        model(torch.randn(4, 8)).sum().backward()
    assert prof.meta["compiled"]


@pytest.mark.parametrize("auto", [False, True], ids=["track(model)", "auto_modules"])
def test_dynamo_loaded_first_inside_a_block_keeps_the_real_module_call(tmp_path, auto):
    """Dynamo binds Module.__call__ when it is imported (to call a module's forward directly
    where __call__ is torch's): imported first inside a block, it kept memprof's for good. And
    inside that block it took that fast path past memprof's call, so a compiled model in auto
    mode was not reported as compiled."""
    import subprocess
    import sys
    block = "memprof.track(auto_modules=True)" if auto else "memprof.track(m)"
    script = tmp_path / "first_compile.py"
    script.write_text(
        "import sys, torch, memprof\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())\n"
        f"with {block} as prof:\n"
        "    cm = torch.compile(m, backend='eager')\n"
        "    cm(torch.ones(3, 2)).sum().backward()\n"
        "import torch._dynamo.utils as u, torch._dynamo.variables.nn_module as n\n"
        "assert u.unpatched_nn_module_call is torch.nn.Module.__call__\n"
        "assert n.unpatched_nn_module_call is torch.nn.Module.__call__\n"
        "assert prof.meta['compiled'], prof.meta\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_tracked_model_can_be_scripted_inside_the_block():
    """No hook on the model either: TorchScript refused the root's pass hooks."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    with memprof.track(model, opt) as prof:
        scripted = torch.jit.script(model)
        assert torch.allclose(scripted(x), model(x))
        _train(model, opt, 4)
    assert prof.throughput["batch_size"] == 4
    assert prof.activations_by_module().get("block", 0) > 0


def test_a_scriptmodule_can_be_tracked():
    """track(torch.jit.script(model)) refused: register_forward_pre_hook is not supported on
    ScriptModules. Its calls are passes of the model (its submodules run inside TorchScript)."""
    scripted = torch.jit.script(Net())
    opt = torch.optim.SGD(scripted.parameters(), lr=0.1)
    with memprof.track(scripted, opt) as prof:
        _train(scripted, opt, 16)
    assert prof.throughput["batch_size"] == 16
    assert prof.breakdown("category", at="peak")["activations"] > 0


def test_a_function_compiled_over_the_model_is_not_compiled_again_in_each_block():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = Net()

    @torch.compile(backend="eager", fullgraph=True)
    def loss_of(x):
        return model(x).sum()

    for _ in range(3):
        with memprof.track(model) as prof:
            loss_of(torch.randn(8, 8)).backward()
        assert prof.meta["compiled"]
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1


def test_a_compiled_model_in_a_container_is_a_pass_of_its_own():
    """A GAN's generator compiled in place: its calls were no pass of their own (its memory
    was nobody's); module_call enters them eagerly, the compiled code inside."""
    class G(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, z):
            return self.fc(z).repeat(1, 100)

    torch._dynamo.reset()
    g = G()
    g.compile(backend="eager")   # in place: its hooks ran inside the compiled code
    models = torch.nn.ModuleDict({"G": g, "D": torch.nn.Linear(800, 1)})
    with memprof.track(models, optimizer=None) as prof:
        for _ in range(3):
            models["D"](models["G"](torch.randn(16, 8))).sum().backward()
            prof.step()
    assert prof.activations_by_module().get("G", 0) >= 16 * 800 * 4   # its repeat's output
    assert prof.throughput["batch_size"] == 16 and prof.meta["compiled"]


def test_a_pass_reads_the_arguments_the_model_is_called_with():
    """Before its own pre-hooks: the batch is the caller's, and the recorded inputs repeat the
    call (the pre-hook runs again on them)."""
    model = Net()
    model.register_forward_pre_hook(lambda m, args: (args[0][:4],))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt) as prof:
        for _ in range(3):
            assert model(torch.randn(8, 8)).shape == (4, 2)
            model(torch.randn(8, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
    assert prof.throughput["batch_size"] == 8


def test_auto_mode_names_modules_without_global_hooks():
    """`memprof run`'s auto mode takes every call through module_call: no global module hook
    (each sent every module of the process down torch's slow path, and torch.compile warned
    of them), the same names and passes."""
    from torch.nn.modules import module as nn_module
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(optimizer=opt, auto_modules=True) as prof:
        assert not nn_module._global_forward_pre_hooks and not nn_module._global_forward_hooks
        _train(model, opt, 16)
    assert prof.throughput["batch_size"] == 16
    assert {"block", "block.fc", "head"} <= set(prof.modules)
    assert prof.activations_by_module().get("block", 0) > 0


def test_auto_mode_a_sequential_compiled_in_place_does_not_break():
    """Dynamo leaves torch's own frames (a Sequential's) to run and compiles the next frame it
    meets: auto mode's handler, which broke its graph at memprof._C (and warned)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    with memprof.track(auto_modules=True):
        seq = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        seq.compile(backend="eager")
        for _ in range(2):
            seq(torch.randn(4, 8)).sum().backward()
    assert dict(counters["graph_break"]) == {}


def test_auto_mode_a_module_on_another_thread_is_no_root_and_no_pass():
    model = Net()
    side = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def background():
        side(torch.randn(2, 8))
        model.head(torch.randn(3, 8))

    with memprof.track(optimizer=opt, auto_modules=True) as prof:
        _train_beside(background, model, opt)
    assert prof.meta["model_class"] == "Net" and "head" in prof.modules
    assert prof.throughput["batch_size"] == 16 and prof.throughput["batch_size_range"] == [16, 16]


@pytest.mark.parametrize("auto", [True, False], ids=["auto_modules", "track(model)"])
def test_a_loop_on_a_thread_the_block_waits_for_is_the_training(auto):
    """A script that trains on a thread it starts and joins (`memprof run` on it): its
    model calls were taken for a background thread's - no pass, no batch size, 0 micro-steps,
    and in auto mode every byte outside modules."""
    import threading
    import time
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(None if auto else model, opt, auto_modules=auto) as prof:
        def train():
            time.sleep(0.05)   # its setup: the block's thread is in join() by the first call
            _train(model, opt, 16, 4)
        worker = threading.Thread(target=train)
        worker.start()
        worker.join()
    t = prof.throughput
    assert t["batch_size"] == 16 and t["micro_steps_per_step"] == 1
    assert t["stats"]["forward_ms"]["median"] > 0
    assert prof.meta["model_class"] == "Net"
    with memprof.track(None if auto else model, opt, auto_modules=auto) as same:
        _train(model, opt, 16, 4)                        # the same loop on the block's thread
    assert prof.activations_by_module() == same.activations_by_module()
    assert prof.activations_by_module()["block"] > 0


class _Wrapper(torch.nn.Module):
    """A wrapper around the tracked model (as DDP is)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_the_training_thread_takes_the_passes_only_when_it_is_the_training():
    """A block entered inside an executor task (whose worker loop is on its stack) is not
    waiting for a background evaluation; preprocessing with a module on an executor (the
    block's thread waits for its results) gives the passes back; a wrapped model called
    on a thread the block joins is the training (its call is inside the wrapper's)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    def beside_an_evaluation(auto):
        model, evaluated = Net(), Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        stop = threading.Event()

        def evaluate():
            while not stop.is_set():
                with torch.no_grad():
                    evaluated(torch.randn(4, 8))
                time.sleep(0.001)
        with memprof.track(None if auto else model, opt, auto_modules=auto) as prof:
            thread = threading.Thread(target=evaluate)
            thread.start()
            time.sleep(0.02)   # the loop's setup: the evaluation calls first
            _train(model, opt, 16, 4)
            stop.set()
            thread.join()
        return prof
    with ThreadPoolExecutor(1) as pool:
        prof = pool.submit(beside_an_evaluation, True).result()
    assert prof.throughput["batch_size"] == 16 and "head" in prof.modules

    model, norm = Net(), torch.nn.LayerNorm(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt) as prof:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda _: norm(torch.randn(16, 8)).detach(), range(8)))
        _train(model, opt, 16, 4)
    assert prof.throughput["batch_size"] == 16
    assert prof.throughput["stats"]["forward_ms"]["n"] == 3

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt) as prof:
        worker = threading.Thread(target=_train, args=(_Wrapper(model), opt, 16, 4))
        worker.start()
        worker.join()
    assert prof.throughput["batch_size"] == 16


def test_the_model_called_on_another_thread_is_no_pass():
    """A background evaluation of the tracked model: its calls ran the pass logic (phase,
    batch markers) across the training thread's passes."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def background():
        with torch.no_grad():
            model(torch.randn(3, 8))

    with memprof.track(model, opt) as prof:
        _train_beside(background, model, opt)
    assert prof.throughput["batch_size"] == 16
    assert not any(prof.throughput["per_step"]["eval_ms"])


def _param_bytes(*models) -> int:
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


def test_auto_mode_a_model_trained_on_a_thread_of_its_own_is_named_and_its_weights_counted():
    """Model A trained on the block's thread, then model B on a thread the script starts
    and joins (or both at once on two threads): B's layers read "outside modules" and its
    weights "other" - its calls were a background thread's, never named. Now it is a root
    of its own, named as on one thread, whose calls are no passes."""
    import threading

    def both(on_threads: bool):
        torch.manual_seed(0)
        with memprof.track(auto_modules=True) as prof:   # a script under `memprof run`
            a, b = Net(), Net()
            opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
            _train(a, opt_a, 16, 3)
            opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
            if on_threads:
                worker = threading.Thread(target=_train, args=(b, opt_b, 16, 3))
                worker.start()
                worker.join()
            else:
                _train(b, opt_b, 16, 3)
        return prof, a, b
    threaded, a, b = both(True)
    single, _, _ = both(False)
    assert threaded.breakdown("category")["parameters"] == _param_bytes(a, b)
    assert threaded.modules == single.modules and len(threaded.modules) >= 6
    assert threaded.breakdown("module") == single.breakdown("module")
    assert threaded.meta["model_class"] == "Net"


def test_auto_mode_a_model_evaluated_beside_the_training_is_named_after_it():
    """A model evaluated on a background thread while the training runs: named (its weights
    are parameters), never the first root even when it is called first, no pass, and the
    trained model's names stay its own (`head`, not `model.head`)."""
    import threading
    import time
    torch.manual_seed(0)
    stop, called = threading.Event(), threading.Event()

    def evaluate():
        while not stop.is_set():
            with torch.no_grad():
                evaluated(torch.randn(4, 8))
            called.set()
            time.sleep(0.001)
    with memprof.track(auto_modules=True) as prof:   # a script under `memprof run`
        model, evaluated = Net(), Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        thread = threading.Thread(target=evaluate)
        thread.start()
        called.wait(5)   # the evaluation calls first
        _train(model, opt, 16, 4)
        stop.set()
        thread.join()
    assert prof.meta["model_class"] == "Net" and "head" in prof.modules
    assert any(n.startswith("evaluated.") for n in prof.modules), prof.modules
    assert prof.breakdown("category")["parameters"] == _param_bytes(model, evaluated)
    assert prof.throughput["batch_size"] == 16 and prof.throughput["batch_size_range"] == [16, 16]


def test_auto_mode_the_model_a_background_thread_called_first_is_still_the_model():
    """A background evaluation that calls the very model before its training starts names it
    first, as a side root; once the training calls it, it is the model: its names without a
    prefix, its calls the passes."""
    import threading
    torch.manual_seed(0)
    with memprof.track(auto_modules=True) as prof:
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def evaluate():
            with torch.no_grad():
                model(torch.randn(4, 8))
        thread = threading.Thread(target=evaluate)
        thread.start()
        thread.join()
        _train(model, opt, 16, 3)
    assert prof.modules == ["", "block", "block.fc", "head"], prof.modules
    assert prof.meta["model_class"] == "Net" and prof.throughput["batch_size"] == 16


def test_auto_mode_side_roots_are_weak_bounded_and_never_wrap_the_model():
    """What a side root must not do (a review's scenarios): keep a model copy evaluated once
    alive (an evaluation of a fresh deepcopy every epoch held every copy until the block
    ended); take DataParallel's per-step replicas (parameters made by autograd, not leaves)
    for models; name the trained model after a wrapper an evaluation thread calls it through;
    fail when the training calls, alone, a submodule that a side root took in."""
    import copy
    import gc
    import threading
    import weakref

    class Predictor(torch.nn.Module):   # an evaluation's wrapper of the model
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x).softmax(-1)

    def on_a_thread(fn):
        thread = threading.Thread(target=fn)
        thread.start()
        thread.join()

    torch.manual_seed(0)
    with memprof.track(auto_modules=True) as prof:
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _train(model, opt, 16, 2)
        copies = []
        for _ in range(3):   # a copy per "epoch", evaluated on a thread, then dropped
            twin = copy.deepcopy(model)
            copies.append(weakref.ref(twin))
            on_a_thread(lambda twin=twin: twin(torch.randn(4, 8)))
            del twin
        gc.collect()
        alive = [r for r in copies if r() is not None]
        replica = torch.nn.Linear(8, 8)   # DataParallel's replicas: parameters not leaves
        replica._parameters["weight"] = replica.weight * 1.0
        on_a_thread(lambda: replica(torch.randn(4, 8)))
        on_a_thread(lambda: Predictor(model)(torch.randn(4, 8)))
        other = Net()
        on_a_thread(lambda: other.block(torch.randn(4, 8)))   # a side root ...
        on_a_thread(lambda: other(torch.randn(4, 8)))         # ... taken in by another
        other.block(torch.randn(2, 8))   # the passes' thread calls the submodule alone
        _train(model, opt, 16, 1)
    assert alive == []
    assert not any("Linear" in n.split(".")[0] or "Predictor" in n for n in prof.modules)
    assert {"block", "block.fc", "head"} <= set(prof.modules), prof.modules
    assert prof.meta["model_class"] == "Net"
