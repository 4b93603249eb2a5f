"""The native hook sees real allocations, with the right sizes and op names, and nothing after stop."""
import threading

import numpy as np
import pytest
import torch

import memprof
from memprof import _C
from memprof.record.events import EVENT_DTYPE


def test_known_allocations_and_frees_are_recorded_with_op_names():
    with memprof.track() as prof:
        a = torch.empty(12_345, dtype=torch.uint8)
        b = torch.zeros(1000, dtype=torch.float32)
        del a
        c = b + 1  # a third, op-named allocation
        del b
    mem = prof.memory
    sizes = mem["size"].tolist()
    assert 12_345 in sizes and -12_345 in sizes
    assert 4000 in sizes and -4000 in sizes
    names = {prof.strings[e["op"]] for e in mem if e["size"] > 0}
    assert {"aten::empty", "aten::zeros", "aten::add"} <= names
    i = sizes.index(12_345)
    j = sizes.index(-12_345)
    assert mem["ptr"][i] == mem["ptr"][j] and i < j
    assert c.numel() == 1000


def test_no_events_after_stop_and_start_stop_idempotent():
    with memprof.track():
        torch.empty(100)
    n = len(_C.events()) // EVENT_DTYPE.itemsize
    torch.empty(5000)
    assert len(_C.events()) // EVENT_DTYPE.itemsize == n
    assert _C.stop() == "" and _C.stop() == ""
    assert not _C.is_active()


def test_start_twice_raises():
    _C.start(1000)
    try:
        with pytest.raises(RuntimeError, match="already active"):
            _C.start(1000)
    finally:
        _C.stop()


def test_capacity_bounds_events_and_counts_drops():
    with pytest.warns(RuntimeWarning, match="dropped"):
        with memprof.track(capacity=10) as prof:
            for _ in range(20):
                torch.empty(64)
    assert prof.memory.size <= 10
    assert prof.meta["dropped"] >= 30


def test_threads_started_while_tracking_are_recorded():
    out = {}

    def work():
        out["t"] = torch.empty(777_777, dtype=torch.uint8)

    with memprof.track() as prof:
        th = threading.Thread(target=work)
        th.start()
        th.join()
    assert 777_777 in prof.memory["size"].tolist()


def test_backward_allocations_carry_autograd_node_and_forward_module(mlp):
    x = torch.randn(8, 64)
    with memprof.track(mlp) as prof:
        mlp(x).sum().backward()
    mem = prof.memory
    nodes = {prof.strings[n] for n in mem["node"] if n >= 0}
    assert "AddmmBackward0" in nodes
    bwd = np.flatnonzero((mem["node"] >= 0) & (mem["size"] > 0))
    bwd_modules = {prof.module_name(int(prof.event_module[i])) for i in bwd}
    assert {"fc1", "fc2"} <= bwd_modules
    assert all(p == 2 for p in mem["phase"][bwd])


def test_torch_profiler_active_gives_one_clear_error():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True):
        with pytest.raises(RuntimeError, match="another profiler"):
            with memprof.track():
                pass
    assert not _C.is_active()
    with memprof.track() as prof:  # usable again afterwards
        torch.empty(10)
    assert prof.memory.size >= 1


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, unused):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2, None


def test_pytorch_sees_no_profiler_while_tracking():
    """PyTorch reads the hook's slot as a profiler state: it must read 'disabled'."""
    x = torch.randn(4, requires_grad=True)
    with memprof.track() as prof:
        assert not torch.autograd._profiler_enabled()
        y = _Double.apply(x, None)   # asks the profiler state whether to record inputs
        y.sum().backward()
        with torch.autograd.profiler.record_function("user_range"):
            z = torch.ones(10)
    assert torch.equal(x.grad, torch.full((4,), 2.0))
    assert z.sum() == 10 and prof.memory.size > 0


def test_an_out_of_memory_report_is_kept_after_the_cap():
    """The OOM is the event a diagnosis needs most: the cap on events never drops it."""
    with pytest.warns(RuntimeWarning, match="dropped"):
        with pytest.raises(RuntimeError):
            with memprof.track(capacity=10) as prof:
                for _ in range(20):
                    torch.empty(64)
                torch.empty(1 << 50, dtype=torch.uint8)   # the CPU allocator refuses it
    assert prof.meta["dropped"] >= 30
    assert [e["requested"] for e in prof.oom_events] == [1 << 50]


def test_markers_and_sequence_records_are_bounded_and_reported():
    """Past the cap, markers and autograd sequence records stop growing too (at least 2**20
    each are kept), and the report says what is missing."""
    from rich.console import Console
    n = (1 << 20) + 500
    with pytest.warns(RuntimeWarning, match="markers"):
        with memprof.track(capacity=10) as prof:
            for i in range(n):
                _C.mark("tick", i)
    assert prof.meta["markers_dropped"] >= 500
    assert len(prof.markers("tick")) <= 1 << 20
    con = Console(record=True, width=200)
    prof.report(console=con)
    assert "markers (steps, phases)" in con.export_text()


def test_hooks_only_session_records_nothing_and_the_next_session_records_again():
    """`start(hooks_only=True)` (benchmarks/per_event.py's floor) installs the hooks and logs
    nothing - no event, no string, no thread - while the slot stays taken as in a session."""
    _C.start(1000, hooks_only=True)
    try:
        assert _C.is_active()
        x = torch.empty(4321, dtype=torch.uint8) + 1
        del x
        _C.push_module(0)           # the Python side's calls record nothing either
        _C.mark("step", 1)
        _C.record_external(12345, 64)
        _C.pop_module()
        with pytest.raises(RuntimeError, match="already active"):
            _C.start(1000)
    finally:
        _C.stop()
    counters = _C.counters()
    assert counters["records"] == 0 and counters["threads"] == 0
    with memprof.track() as prof:
        y = torch.empty(4321, dtype=torch.uint8)
        del y
    assert 4321 in prof.memory["size"].tolist()
    assert "aten::empty" in {prof.strings[e["op"]] for e in prof.memory if e["size"] > 0}


def test_backward_node_names_are_each_nodes_own_under_reused_name_buffers():
    """Backward node names are strings of their RecordFunction, often at the address the last
    node's name had: each event must carry its own node's name, over many steps (the name
    cache is keyed by address and checked by content)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4),
                                torch.nn.Sigmoid())
    x = torch.randn(5, 8)
    with memprof.track(model) as prof:
        for _ in range(3):
            (model(x) * 3).sum().backward()
    mem = prof.memory
    names = [prof.strings[n] for n in mem["node"] if n >= 0]
    assert {"AddmmBackward0", "ReluBackward0", "SigmoidBackward0", "MulBackward0"} <= set(names)
    # each node's allocations are what that node computes: ReluBackward0's gradient is the
    # 5 x 16 float input gradient, SigmoidBackward0's the 5 x 4 one
    sizes = {}
    for e in mem:
        if e["node"] >= 0 and e["size"] > 0:
            sizes.setdefault(prof.strings[e["node"]], set()).add(int(e["size"]))
    assert 5 * 16 * 4 in sizes["ReluBackward0"]
    assert 5 * 4 * 4 in sizes["SigmoidBackward0"]
    assert 5 * 16 * 4 not in sizes["SigmoidBackward0"]


def _function_allocating_in_backward(i: int):
    """A custom autograd Function named Fn<i> whose backward allocates a block of (i + 1) * 64
    bytes: its node, "Fn<i>Backward", is a Python node with a name of its own."""
    def forward(ctx, x):
        return x * 1.0

    def backward(ctx, grad):
        scratch = torch.empty((i + 1) * 64, dtype=torch.uint8)
        return grad + scratch[:1].float().sum() * 0.0

    return type(f"Fn{i}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def test_each_of_many_backward_nodes_is_named_right_every_step():
    """More node names than the name cache first holds (it grows), each evaluated frame's name
    a fresh string, often at the address of the last one's: every node's own allocation
    carries that node's name, in every step."""
    functions = [_function_allocating_in_backward(i) for i in range(80)]
    x = torch.randn(4, requires_grad=True)
    with memprof.track() as prof:
        for _ in range(3):
            y = x
            for f in functions:
                y = f.apply(y)
            y.sum().backward()
    mem = prof.memory
    seen = {}
    for e in mem[(mem["node"] >= 0) & (mem["size"] > 0)]:
        seen.setdefault(prof.strings[e["node"]], []).append(int(e["size"]))
    for i in range(80):
        sizes = seen.get(f"Fn{i}Backward", [])
        assert sizes.count((i + 1) * 64) == 3, (i, sizes)
        # no other Function's block under this name
        assert not {s for s in sizes if s % 64 == 0 and s // 64 <= 80} - {(i + 1) * 64}, (i, sizes)


def test_marker_labels_are_read_by_text_not_by_object():
    """Markers are interned through the thread's name cache, keyed by the label's address and
    checked by its text: equal labels built at run time are one label, different ones made in
    the same place stay apart, and any text round-trips."""
    with memprof.track() as prof:
        for i in range(3):
            _C.mark("".join(["ph", "ase"]), i)      # a new str object each time, same text
            _C.mark(f"chunk {i}", i)                 # new text each time
        _C.mark("Größe ∑", 7)
    assert [m["value"] for m in prof.markers("phase")] == [0, 1, 2]
    assert [len(prof.markers(f"chunk {i}")) for i in range(3)] == [1, 1, 1]
    assert [m["value"] for m in prof.markers("Größe ∑")] == [7]
    with pytest.raises(TypeError):
        _C.mark(b"bytes", 0)


def test_a_label_that_cannot_be_encoded_raises_its_own_error():
    """mark()'s label is encoded as UTF-8: a lone surrogate raises Python's UnicodeEncodeError
    (as the pybind11 binding did), not a RuntimeError that carries its text."""
    with memprof.track():
        with pytest.raises(UnicodeEncodeError):
            _C.mark("a\udc80", 1)
        _C.mark("after", 1)   # nothing left set
