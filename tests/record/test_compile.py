"""A torch.compile'd model tracked for a few steps on the CPU: memprof's module hooks cause no
graph break (they step aside while dynamo traces), the categories are right, the report says
attribution is per compiled module, and the steps that compiled - the first, and one that
recompiles for a new batch size - are left out of the throughput statistics, so no data-wait or
host-time finding comes from compile time (issue 14).

backend="aot_eager": dynamo and AOT autograd as with inductor (forward and backward graphs,
lazy backward compile) without inductor's C++ build, which takes minutes on this machine."""
import contextlib

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, TensorDataset

import memprof
from memprof.analyse import throughput


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(32, 64)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(64, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def fit(auto: bool):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(model, backend="aot_eager")
    data = TensorDataset(torch.randn(38, 32), torch.randn(38, 4))
    # batches of 8, then a last one of 6: a recompile inside the run
    loader = DataLoader(data, batch_size=8)
    with (memprof.track(auto_modules=True) if auto else memprof.track(compiled)) as prof:
        for x, y in loader:
            torch.nn.functional.mse_loss(compiled(x), y).backward()
            opt.step()
            opt.zero_grad()
    return prof, model


@pytest.mark.slow
@pytest.mark.parametrize("auto", [False, True], ids=["track(model)", "auto_modules"])
def test_compiled_model_no_graph_break_right_categories_no_false_finding(auto):
    prof, model = fit(auto)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] >= 1
    params = sum(p.nbytes for p in model.parameters())
    end = prof.breakdown("category", at="end")
    assert end["parameters"] == (0 if auto else params)   # auto: built before the block
    assert prof.breakdown("category", at="peak")["activations"] > 0
    assert prof.breakdown("category", at=0)["gradients"] == sum(p.nbytes for p in
                                                                 model.parameters())
    assert prof.meta["compiled"] and prof.meta["model_class"] == "MLP"
    assert not any("_orig_mod" in name for name in prof.modules)
    assert {"fc1", "fc2"} <= set(prof.modules)

    compiled_steps = prof.run.records["compile"]["steps"]
    assert compiled_steps[0] == 0 and 4 in compiled_steps    # the batch of 6 recompiled
    t = throughput.summarize(prof)
    assert t["steps"] == 5 and t["compile_steps_excluded"] == 1
    assert t["steps_measured"] == 3                          # steps 1-3
    assert memprof.findings(prof) == []


def test_hooks_step_aside_only_while_compiling(mlp):
    """Eager modules called from a compiled function still attribute; the compiled function's
    own modules do not break its graph."""
    torch._dynamo.reset()
    counters.clear()
    head = torch.nn.Linear(10, 2)

    @torch.compile(backend="eager", fullgraph=True)      # a graph break here would raise
    def body(x):
        return mlp(x)

    with memprof.track(auto_modules=True) as prof:
        for _ in range(2):
            head(body(torch.randn(8, 64))).sum().backward()
    assert dict(counters["graph_break"]) == {}
    assert prof.modules == [""] and prof.meta["model_class"] == "Linear"  # head: eager
    assert prof.meta["compiled"]                 # mlp's modules ran inside the graph
    assert prof.breakdown("category", at="end")["gradients"] == sum(
        p.nbytes for p in head.parameters())


@pytest.mark.parametrize("optimizer", [False, True])
def test_a_non_strict_export_inside_the_block_is_not_tracked_as_a_forward(optimizer):
    """torch.export (non-strict) runs the model's Python forward on fake tensors: the hooks
    step aside there as under dynamo - a hand-written update's parameter check would read
    fake values, and the batch marker would pin the symbolic batch size."""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if optimizer else None
    batch = torch.export.Dim("batch")
    with memprof.track(model) as prof:
        for i in range(2):
            model(torch.randn(8, 32)).sum().backward()
            if opt is not None:
                opt.step()
                opt.zero_grad()
            else:
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.1 * p.grad
                        p.grad = None
        torch.export.export(model, (torch.randn(8, 32),), strict=False,
                            dynamic_shapes=({0: batch},))
        model(torch.randn(8, 32))
    assert len(prof.markers("forward_start")) == 3      # the export's pass is not one
    assert [m["value"] for m in prof.markers("batch")] == [8, 8, 8]
    assert prof.profile.run.meta["steps_marked"] == 2


def _compiled_fit(how: str):
    """6 AdamW steps of the MLP, compiled as `how` says: "in place" (model.compile() before
    the block), "in block" (model.compile() inside it), "wrapper" (cm = torch.compile(model),
    the loop calls cm, the block tracks model), or "auto" (model.compile() inside a block
    without a model, as under `memprof run`)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    call = model
    if how == "in place":
        model.compile(backend="aot_eager")
    elif how == "wrapper":
        call = torch.compile(model, backend="aot_eager")
    x, y = torch.randn(8, 32), torch.randn(8, 4)
    with (memprof.track(auto_modules=True) if how == "auto" else memprof.track(model, opt)) \
            as prof:
        if how in ("in block", "auto"):
            model.compile(backend="aot_eager")
        losses = []
        for _ in range(6):
            loss = torch.nn.functional.mse_loss(call(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    return prof, model, losses


@pytest.mark.parametrize("how", ["in place", "in block", "wrapper", "auto"])
def test_a_model_compiled_in_place_or_through_its_wrapper_has_forward_passes(how):
    """These showed forward 0 ms, 0 micro-steps per step and no batch size: the model's hooks
    run inside the compiled code, where they step aside."""
    from torch._dynamo.eval_frame import OptimizedModule
    before = (OptimizedModule.__dict__.get("__call__"), torch.nn.Module.compile)
    prof, model, losses = _compiled_fit(how)
    tp = throughput.summarize(prof)
    assert len(prof.marker_positions("forward_start")) == 6
    assert tp["micro_steps_per_step"] == 1 and tp["batch_size"] == 8
    assert tp["stats"]["forward_ms"]["median"] > 0
    assert len(prof.profile.run.records["inputs"]["args"]) == 1   # the model's own call: (x,)
    # the instance is as it was: compiled, without memprof's entry
    assert not getattr(model._compiled_call_impl, "_memprof_pass", False) \
        if model._compiled_call_impl is not None else how == "wrapper"
    assert (OptimizedModule.__dict__.get("__call__"), torch.nn.Module.compile) == before


def test_a_compiled_function_checkpointing_tracked_modules_has_no_graph_break():
    """torch.utils.checkpoint inside a compiled function is a higher-order op: dynamo traces its
    body apart and refuses a store to a global there. The module calls inside step aside
    without one (before: a graph break, and under fullgraph=True an error in the user's code)."""
    from torch.utils.checkpoint import checkpoint

    def grads(track: bool):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = MLP()

        @torch.compile(backend="eager", fullgraph=True)   # a graph break here would raise
        def body(x):
            h = checkpoint(model.fc1, x, use_reentrant=False)
            return checkpoint(lambda t: model.fc2(model.act(t)), h, use_reentrant=False)

        x = torch.randn(8, 32)
        with memprof.track(model) if track else contextlib.nullcontext() as prof:
            for _ in range(2):
                body(x).sum().backward()
        assert dict(counters["graph_break"]) == {}
        return [p.grad for p in model.parameters()], prof

    eager, _ = grads(track=False)
    tracked, prof = grads(track=True)
    assert all(torch.equal(a, b) for a, b in zip(eager, tracked))
    assert prof.meta["compiled"]    # the modules ran inside what dynamo traced
    assert prof.breakdown("category", at="end")["gradients"] == sum(g.nbytes for g in tracked)


def test_a_function_compiled_before_the_block_is_reported_as_compiled():
    """A compiled training step warmed up before tracking: its trace holds no module call of
    memprof's to replay, so the compiled code's own frame ("Torch-Compiled Region") says it
    ran; a later block without compiled code is not marked."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()

    @torch.compile(backend="eager")
    def loss_of(x):
        return model(x).sum()

    x = torch.randn(8, 32)
    loss_of(x).backward()                  # compiled here, outside any block
    with memprof.track(model) as prof:
        loss_of(x).backward()
    assert prof.meta["compiled"]
    with memprof.track(model) as eager:
        model(x).sum().backward()
    assert not eager.meta["compiled"]


@pytest.mark.parametrize("auto", [False, True], ids=["track(model)", "auto_modules"])
def test_a_compiled_model_that_breaks_its_graph_compiles_none_of_memprofs_frames(auto):
    """A compiled Sequential (torch's own forward: dynamo compiles a frame around its call)
    whose hook breaks the graph, as FSDP2's do: dynamo then runs the call eagerly and compiles
    every frame it calls. The bookkeeping of a pass runs with dynamo's frame callback off
    (before, dynamo compiled memprof's pass start and end, broke at memprof._C there and
    warned for each)."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    model.register_forward_pre_hook(lambda m, args: torch._dynamo.graph_break())
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(8, 32)
    with memprof.track(auto_modules=True) if auto else memprof.track(model) as prof:
        for _ in range(2):
            compiled(x).sum().backward()
    breaks = " ".join(dict(counters["graph_break"]))
    assert breaks and "memprof" not in breaks, breaks    # the hook's break, none of ours
    assert prof.breakdown("category", at="end")["gradients"] == sum(
        p.nbytes for p in model.parameters())


def _memprof_frames_dynamo_compiled() -> list[str]:
    """memprof's functions that dynamo compiled as frames of their own (cache entries)."""
    import gc
    import types

    entries = getattr(torch._C._dynamo.eval_frame, "_debug_get_cache_entry_list", None)
    if entries is None:
        pytest.skip("this torch has no _debug_get_cache_entry_list")
    from memprof.record import module_call

    codes = {o.__code__ for o in gc.get_objects()   # (type(): a weak proxy's isinstance raises)
             if type(o) is types.FunctionType and (o.__module__ or "").startswith("memprof.")}
    codes.update(module_call._entry_points)   # (the backward wrapper is gone with its patch)
    return sorted(c.co_qualname for c in codes if entries(c))


@pytest.mark.parametrize("what", ["train step", "optimizer step"])
def test_a_compiled_training_step_compiles_none_of_memprofs_frames(what):
    """A compiled training step (forward, backward, optimizer step) or a compiled optimizer
    step: dynamo breaks the graph at backward and where it meets memprof's hooks, and runs
    those eagerly; memprof's hooks and what they call are never compiled as frames of their
    own (before: each broke again at memprof._C, 21 graph breaks in 6 steps instead of 5,
    and a hook traced as stepping aside would have done nothing at run time)."""
    def run(track: bool):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        @torch.compile(backend="eager")
        def train_step(x):
            loss = model(x).sum()
            loss.backward()
            opt.step()
            opt.zero_grad()

        @torch.compile(backend="eager")
        def update():
            opt.step()

        def step(x):
            if what == "train step":
                return train_step(x)
            model(x).sum().backward()
            update()
            opt.zero_grad()

        x = torch.randn(8, 32)
        step(x)                                   # compiled before the block
        counters.clear()
        with memprof.track(model, opt) if track else contextlib.nullcontext() as prof:
            for _ in range(4):
                step(x)
        return [p.detach().clone() for p in model.parameters()], prof

    eager, _ = run(track=False)
    tracked, prof = run(track=True)
    assert all(torch.equal(a, b) for a, b in zip(eager, tracked))
    assert _memprof_frames_dynamo_compiled() == []
    # the graph breaks at memprof's hooks are clean ones (no "does not know how to trace"
    # warning naming memprof._C or the frame callback)
    breaks = " ".join(dict(counters["graph_break"]))
    assert "memprof" not in breaks and "eval_frame" not in breaks, breaks
    assert prof.meta["steps_marked"] == 4 and prof.meta["compiled"]
