"""Out of memory, explained: real CPU allocation failures inside tracked training steps, and
hand-built runs for the causes a CPU cannot produce (a leak that fills the device, a cache too
fragmented for the request)."""
import contextlib
import gc
import traceback

import pytest
import torch

import memprof
from memprof.analyse.oom import FIXES, classify, diagnose, out_of_memory
from memprof.record.events import KIND_OUT_OF_MEMORY

from tests.analyse.runs import RunBuilder

IMPOSSIBLE = 1 << 50   # bytes: the CPU allocator refuses it (RuntimeError, recorded as an OOM)


class Huge(torch.autograd.Function):
    """Cheap forward; its backward asks for an impossible buffer."""
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g + torch.empty(IMPOSSIBLE, dtype=torch.uint8).sum()


class Head(torch.nn.Module):
    def __init__(self, boom_in_forward: bool):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.boom_in_forward = boom_in_forward
        self.armed = True

    def forward(self, x):
        x = self.proj(x)
        if not self.armed:
            return x
        if self.boom_in_forward:
            return x + torch.empty(IMPOSSIBLE, dtype=torch.uint8).sum()
        return Huge.apply(x)


class Net(torch.nn.Module):
    def __init__(self, boom_in_forward: bool):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU())
        self.reduce = torch.nn.Linear(64, 16)
        self.head = Head(boom_in_forward)

    def forward(self, x):
        return self.head(self.reduce(self.body(x)))


def _train_until_boom(tmp_path, boom_in_forward: bool, boom_step: int = 2):
    """Train a few steps; the head's impossible allocation fires in step `boom_step`."""
    torch.manual_seed(0)
    model = Net(boom_in_forward)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "oom.memprof"
    with pytest.raises(RuntimeError, match="can't allocate memory") as excinfo:
        with memprof.track(model, opt, path=str(path)) as prof:
            for step in range(boom_step + 1):
                model.head.armed = step == boom_step
                loss = model(torch.randn(8, 16)).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
    return prof, excinfo, path


def test_forward_oom_names_module_op_phase_step_and_prints_before_the_traceback(tmp_path,
                                                                                capfd):
    prof, excinfo, path = _train_until_boom(tmp_path, boom_in_forward=True)
    err = capfd.readouterr().err
    # the original exception and its traceback are untouched: the last frame is the forward
    assert "can't allocate memory" in str(excinfo.value)
    frames = traceback.extract_tb(excinfo.value.__traceback__)
    assert frames[-1].name == "forward" and "torch.empty(IMPOSSIBLE" in frames[-1].line
    # printed to stderr while leaving the block
    assert "Out of memory: why" in err and "head" in err and "aten::empty" in err
    assert "one request larger than the device" in err
    [f] = [f for f in prof.findings if f.kind == "out_of_memory"]
    req = f.evidence["request"]
    assert (req["step"], req["phase"], req["module"], req["op"]) == (2, "forward", "head",
                                                                     "aten::empty")
    assert req["requested"] == IMPOSSIBLE and req["device"] == "cpu"
    assert f.evidence["cause"]["cause"] == "single_request"
    alive = f.evidence["alive"]
    # parameters of all four linears are alive, and the step's activations so far
    n_params = sum(p.numel() * 4 for p in Net(True).parameters())
    assert alive["by_category"]["parameters"] == n_params
    assert alive["by_category"]["activations"] > 0
    assert alive["bytes"] == sum(alive["by_category"].values())
    assert f.evidence["memory"]["fragmentation"] is None   # the CPU allocator has no cache
    # saved with the diagnosis
    loaded = memprof.load(str(path))
    assert [g.evidence["request"]["module"] for g in loaded.findings
            if g.kind == "out_of_memory"] == ["head"]


def test_backward_oom_is_attributed_to_the_forward_module_and_autograd_node(tmp_path, capfd):
    prof, _, _ = _train_until_boom(tmp_path, boom_in_forward=False)
    [f] = [f for f in prof.findings if f.kind == "out_of_memory"]
    req = f.evidence["request"]
    assert (req["step"], req["phase"], req["module"], req["node"]) == (2, "backward", "head",
                                                                       "HugeBackward")
    assert "autograd node HugeBackward" in capfd.readouterr().err


def test_report_of_a_loaded_profile_shows_the_diagnosis(tmp_path):
    from rich.console import Console
    _, _, path = _train_until_boom(tmp_path, boom_in_forward=True)
    console = Console(record=True, width=200)
    memprof.load(str(path)).report(console=console)
    text = console.export_text()
    assert "Out of memory: why" in text and "step 2, forward, module head" in text
    assert text.index("Out of memory: why") < text.index("Findings")


def test_oom_caught_inside_the_block_is_diagnosed_but_not_printed(capfd):
    model = Net(True)
    with memprof.track(model) as prof:
        try:
            model(torch.randn(2, 16))
        except RuntimeError:
            pass
    assert "Out of memory" not in capfd.readouterr().err
    assert [f.kind for f in prof.findings if f.kind == "out_of_memory"] == ["out_of_memory"]


# ------------------------------------------------------------------ hand-built runs
MIB = 1 << 20


def _oom(b: RunBuilder, size: int, allocated: int, reserved: int) -> None:
    b._row(ptr=0, size=size, op=b._sid("aten::mm"), kind=KIND_OUT_OF_MEMORY,
           total_allocated=allocated, total_reserved=reserved, module=1)


def _steps(b: RunBuilder, n: int, leak: int, act: int = 4 * MIB) -> None:
    """n steps of forward/backward; each keeps `leak` bytes alive forever."""
    for s in range(n):
        base = 1000 * (s + 1)
        b.phase = "forward"
        b.alloc(base + 1, act, "aten::linear")
        if leak:
            b.alloc(base + 2, leak, "aten::softmax")
        b.mark("forward_end")
        b.phase = "backward"
        b.free(base + 1, act)
        b.phase = "other"
        b.mark("step")


def _builder() -> RunBuilder:
    b = RunBuilder()
    b.modules = ["", "blocks.0"]
    b.alloc(1, 8 * MIB, "aten::empty")      # parameters stand-in
    return b


def test_leak_that_fills_the_device_is_growth():
    b = _builder()
    _steps(b, 6, leak=2 * MIB)
    b.phase = "forward"
    b.alloc(99_001, 4 * MIB, "aten::linear")
    _oom(b, 8 * MIB, allocated=32 * MIB, reserved=34 * MIB)
    d = diagnose(b.profile(), capacity=40 * MIB, capacity_source="test device")
    assert d["cause"]["cause"] == "growth"
    assert d["cause"]["slope_bytes_per_step"] == pytest.approx(2 * MIB)
    assert d["cause"]["still_alive"][0]["op"] == "aten::softmax"
    assert d["request"]["step"] == 6 and d["request"]["module"] == "blocks.0"
    assert d["memory"]["fragmentation"] == pytest.approx(2 / 34)
    assert not d["memory"]["request_fits_in_cache"]


def test_first_step_too_big_and_a_later_step_too_big():
    b = _builder()
    b.phase = "forward"
    b.alloc(10, 30 * MIB, "aten::linear")
    _oom(b, 16 * MIB, allocated=38 * MIB, reserved=40 * MIB)
    c = diagnose(b.profile(), capacity=40 * MIB)["cause"]
    assert c["cause"] == "step_too_big" and c["first_step"] and c["step"] == 0

    b = _builder()
    _steps(b, 2, leak=0)
    b.phase = "optimizer"
    b.alloc(50, 16 * MIB, "aten::zeros_like")       # optimizer state, kept
    b.phase = "other"
    b.mark("step")
    b.phase = "forward"
    b.alloc(51, 12 * MIB, "aten::linear")
    _oom(b, 8 * MIB, allocated=36 * MIB, reserved=38 * MIB)
    c = classify(b.profile(), 3, 8 * MIB, 40 * MIB)
    assert c["cause"] == "step_too_big" and not c["first_step"]
    assert c["live_at_step_start"] == 24 * MIB and c["earlier_peak"] == 24 * MIB
    # a request for the whole device (seen on an H200: torch.empty(total_memory)) can never be
    # served - the CUDA context holds part of it - so it is the request, not the step
    whole = classify(b.profile(), 3, 40 * MIB, 40 * MIB)
    assert whole["cause"] == "single_request"
    assert whole["text"] == ("one request of 40.00 MiB is all of the given capacity "
                             "(40.00 MiB) by itself")
    named = classify(b.profile(), 3, 48 * MIB, 40 * MIB, "a budget of 40.00 MiB")
    assert named["text"] == ("one request of 48.00 MiB is larger than a budget of 40.00 MiB "
                             "by itself")
    assert classify(b.profile(), 3, 40 * MIB - 1, 40 * MIB)["cause"] == "step_too_big"


def test_fragmented_cache_is_named_with_expandable_segments():
    b = _builder()
    b.phase = "forward"
    b.alloc(10, 2 * MIB, "aten::linear")
    _oom(b, 6 * MIB, allocated=10 * MIB, reserved=30 * MIB)   # 20 MiB cached but free
    [f] = out_of_memory(b.profile())
    assert f.evidence["memory"]["request_fits_in_cache"]
    assert "expandable_segments:True" in f.fix
    assert f.evidence["memory"]["fragmentation"] == pytest.approx(20 / 30)


def test_no_oom_no_finding():
    b = _builder()
    _steps(b, 2, leak=0)
    assert out_of_memory(b.profile()) == [] and diagnose(b.profile()) is None


# ------------------------------------------------------------------ after the log filled
def _train_past_the_log(capacity: int | None):
    """Six steps that keep 4,000 bytes each (a list of tensors); the sixth runs out of memory.
    With a small `capacity` the event log fills in the first steps (collected garbage of
    earlier tests first: its frees inside the block would take a step's share of the log)."""
    gc.collect()
    torch.manual_seed(0)
    model = Net(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kept = []
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        with pytest.warns(RuntimeWarning, match="dropped") if capacity else contextlib.nullcontext():
            with memprof.track(model, opt, **({"capacity": capacity} if capacity else {})) \
                    as prof:
                for step in range(6):
                    model.head.armed = step == 5
                    loss = model(torch.randn(8, 16)).pow(2).mean()
                    kept.append(torch.randn(1000))
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
    return prof


def test_an_oom_after_the_log_filled_is_not_explained_by_the_logs_end(capfd):
    """The log's end is steps before the OOM: what it holds alive then is not what was alive
    at the OOM, and the step it came in was not seen. The diagnosis says so, with what is
    known - the allocator's own count at the OOM against the one at the log's end, the growth
    of the recorded steps - and the capacity that records up to the OOM. (A capacity above
    the request: on this CPU the request is larger than the RAM, which needs no log.)"""
    prof = _train_past_the_log(capacity=200)
    capfd.readouterr()
    d = diagnose(prof, capacity=1 << 52, capacity_source="a test device")
    req, cause = d["request"], d["cause"]
    assert req["step"] == 5 and req["dropped_before"] > 0
    assert cause["cause"] == "past_the_log"
    assert 0 < cause["log_end_step"] < 5
    # the allocator's count of the OOM's moment against its count in the log's last row
    last = prof.memory[prof.memory["thread"] >= 0][-1]
    assert cause["allocated_at_log_end"] == last["total_allocated"]
    assert cause["grew_since"] == req["total_allocated"] - cause["allocated_at_log_end"] > 0
    assert cause["growing"]   # the recorded steps already grew
    assert cause["capacity_needed"] > 200
    assert cause["capacity_needed_bytes"] == cause["capacity_needed"] * 72
    assert f"filled in step {cause['log_end_step']}" in cause["text"]
    assert d["alive"]["at_log_end"]
    assert d["memory"]["alive"] == req["total_allocated"]   # the allocator's, not the log's
    # one request larger than the device needs no log: the finding says so, as before
    [f] = [f for f in prof.findings if f.kind == "out_of_memory"]
    assert f.evidence["cause"]["cause"] == "single_request"
    # ... and what it shows alive is still the log's end's, said so
    assert f.evidence["alive"]["at_log_end"]
    assert f.evidence["memory"]["alive"] == req["total_allocated"]
    assert f"at its end (step {cause['log_end_step']})" in f.evidence["memory"]["text"]


def test_an_oom_the_log_holds_is_explained_as_before():
    prof = _train_past_the_log(capacity=None)
    d = diagnose(prof, capacity=1 << 52)
    assert d["request"]["dropped_before"] == 0
    assert d["cause"]["cause"] == "growth" and "at_log_end" not in d["alive"]


def test_the_report_of_an_oom_after_the_log_filled(monkeypatch):
    """A hand-built run: six recorded steps that each keep 2 MiB (the log ends in the
    sixth); the OOM report (8 MiB, step 9) says 3,000 events were dropped before it."""
    from rich.console import Console
    from memprof.report.oom import print_diagnosis

    b = _builder()
    _steps(b, 6, leak=2 * MIB)
    for row in b.rows:   # the allocator's count, as a real log's rows carry it
        row["total_allocated"] = 8 * MIB + 2 * MIB * row["step"]
    b.step = 9
    b.phase = "forward"
    _oom(b, 8 * MIB, allocated=30 * MIB, reserved=32 * MIB)
    b.rows[-1]["ptr"] = 3000
    profile = b.profile()
    profile.meta["capacity"] = len(b.rows) - 1
    [f] = out_of_memory(profile)
    cause = f.evidence["cause"]
    assert cause["cause"] == "past_the_log" and cause["log_end_step"] == 5
    assert cause["allocated_at_log_end"] == 18 * MIB and cause["grew_since"] == 12 * MIB
    assert "(+12.00 MiB over 4 steps)" in cause["text"]
    assert f.fix.startswith(FIXES["growth"])
    # steps 0-4 (whole) took 16 events, 4 a step rounded up; steps 0-9 need 40, a number the
    # option takes as written
    assert cause["events_per_step"] == 4 and cause["capacity_needed"] == 40
    assert "memprof run --capacity 40 (" in f.fix
    # steps up to the OOM that no log could hold (the bound set below the 40 needed): no
    # capacity to pass
    monkeypatch.setattr("memprof.analyse.oom.MAX_CAPACITY", 39)
    [late] = out_of_memory(profile)
    assert late.evidence["cause"]["capacity_too_large"] and "--capacity" not in late.fix
    assert "more than one log holds" in late.fix
    console = Console(record=True, width=300)
    profile.findings[:] = [f]
    print_diagnosis(profile, console)
    text = console.export_text()
    assert "not recorded (after the event log filled)" in text
    assert "alive at the log's end" in text and "step 9" in text


def test_an_oom_on_another_device_after_the_log_filled_compares_no_counts():
    """The log holds cuda:0's events; the OOM is cuda:1's: its allocator count is not
    compared with cuda:0's (it read "1 GiB at the OOM against 70 GiB at the log's end")."""
    from memprof.record.events import DEVICE_CUDA
    b = _builder()
    _steps(b, 2, leak=0)
    for row in b.rows:
        row.update(device_type=DEVICE_CUDA, total_allocated=70 * MIB)
    b.step = 5
    _oom(b, 8 * MIB, allocated=1 * MIB, reserved=2 * MIB)
    b.rows[-1].update(ptr=10, device_type=DEVICE_CUDA, device_index=1)
    d = diagnose(b.profile(), capacity=40 * MIB)
    assert d["cause"]["cause"] == "past_the_log"
    assert d["cause"]["allocated_at_log_end"] is None and d["cause"]["grew_since"] is None
    assert "allocator's own count" not in d["cause"]["text"]


def test_a_budget_replay_does_not_place_an_oom_after_the_log_filled():
    """The replay put the OOM's request back at its position - the log's end, steps before
    the OOM - and diagnosed "steps 0-8 fitted, step 9 started with ..." from there."""
    from memprof.plan.budget import replay
    b = _builder()
    _steps(b, 3, leak=0)
    b.step = 9
    _oom(b, 30 * MIB, allocated=30 * MIB, reserved=32 * MIB)
    b.rows[-1]["ptr"] = 100
    result = replay(b.profile(), 24 * MIB)
    assert result.fits and result.failure is None
    b.rows[-1]["ptr"] = 0   # the same request inside the log: replayed where it was made
    assert replay(b.profile(), 24 * MIB).failure is not None
