"""Throughput: phases per step, data wait, samples/s, gradient accumulation, CUDA-event path."""
import sys
import threading
import time
import types

import pytest
import torch

import memprof
from memprof.analyse import throughput as tp
from memprof.record import throughput as throughput_recorder
from memprof.record.throughput import GpuSampler

D, H, C = 64, 128, 10


pytestmark = pytest.mark.usefixtures("collect_garbage_after")


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.ReLU(), torch.nn.Linear(H, C))


class SlowBatches(torch.utils.data.Dataset):
    """Ready batches served `sleep` seconds late: a slow data loader."""

    def __init__(self, batches, sleep):
        self.batches, self.sleep = list(batches), sleep

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        time.sleep(self.sleep)
        return self.batches[i]


def train(model, opt, batches, *, accum=1, sleep=0.0, prof=None):
    if sleep:   # the wait happens inside the DataLoader's iterator, before the forward
        batches = torch.utils.data.DataLoader(SlowBatches(batches, sleep), batch_size=None)
    for i, (x, y) in enumerate(batches):
        loss = torch.nn.functional.cross_entropy(model(x), y) / accum
        loss.backward()
        if (i + 1) % accum == 0:
            opt.step()
            opt.zero_grad()


def batches(n, b=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, D, generator=g), torch.randint(0, C, (b,), generator=g))
            for _ in range(n)]


# ------------------------------------------------------------------ exact phase arithmetic
def test_phase_table_arithmetic_is_exact():
    ms = 1_000_000
    e = [("step", 0, 0),
         ("forward_start", 10 * ms, 1), ("batch", None, 8), ("forward_end", 20 * ms, 1),
         ("backward_start", 25 * ms, 0), ("backward_end", 45 * ms, 1),
         ("forward_start", 50 * ms, 1), ("batch", None, 8), ("forward_end", 60 * ms, 1),
         ("backward_start", 62 * ms, 0), ("backward_end", 80 * ms, 1),
         ("optimizer_start", 85 * ms, 1), ("step", 100 * ms, 1)]
    rows = tp.phase_table(e)
    # the window before the first boundary is row 0 (empty); the measured step is row 1
    r = {k: v[1] for k, v in rows.items()}
    assert r["wall_ms"] == pytest.approx(100)
    assert r["data_ms"] == pytest.approx(10 + 5)      # before micro-step 1 and 2
    assert r["forward_ms"] == pytest.approx(20)
    assert r["backward_ms"] == pytest.approx(38)
    assert r["optimizer_ms"] == pytest.approx(15)
    assert r["other_ms"] == pytest.approx(12)          # loss computation between phases
    assert r["micro_steps"] == 2 and r["samples"] == 16 and r["batch_size"] == 8
    # override: samples = override x micro-steps
    assert tp.phase_table(e, batch_override=5)["samples"][1] == 10


def test_phase_shares_add_up_to_the_step():
    """Shares of the measured steps' time, not ratios of medians (which added to 132 % in the
    demo when one phase's slow steps were not another's)."""
    ms = 1_000_000
    e, t = [("step", 0, 0)], 0
    # each step 100 ms: 1 before forward, then forward, backward, optimizer, two of them long
    for i, (fwd, bwd, opt) in enumerate([(49, 49, 1), (49, 1, 49), (1, 49, 49), (49, 49, 1),
                                         (49, 1, 49), (1, 49, 49), (49, 49, 1)]):
        e += [("forward_start", (t + 1) * ms, 1), ("batch", None, 4),
              ("forward_end", (t + 1 + fwd) * ms, 1), ("backward_start", (t + 1 + fwd) * ms, 0),
              ("backward_end", (t + 1 + fwd + bwd) * ms, 1),
              ("optimizer_start", (t + 1 + fwd + bwd) * ms, 1),
              ("step", (t + 100) * ms, i + 1)]
        t += 100
    st = tp.compute(e, clock="host", warmup=1)["stats"]
    phases = ("data_ms", "forward_ms", "eval_ms", "backward_ms", "optimizer_ms", "other_ms")
    assert sum(st[k]["share"] for k in phases if st.get(k)) == pytest.approx(1.0)
    assert st["wall_ms"]["share"] == pytest.approx(1.0)
    assert sum(st[k]["median"] for k in ("forward_ms", "backward_ms", "optimizer_ms")) / \
        st["wall_ms"]["median"] > 1.4   # what the medians' ratios said


def test_first_step_has_no_data_wait_and_eval_forwards_are_not_micro_steps():
    ms = 1_000_000
    e = [("forward_start", 0, 0), ("forward_end", 1 * ms, 0),            # eval, no backward
         ("forward_start", 2 * ms, 0), ("forward_end", 3 * ms, 0),
         ("backward_start", 4 * ms, 0), ("backward_end", 6 * ms, 0),
         ("optimizer_start", 7 * ms, 0), ("step", 8 * ms, 0)]
    rows = tp.phase_table(e)
    assert rows["data_ms"] == [None]
    assert rows["wall_ms"] == [pytest.approx(8)]
    assert rows["micro_steps"] == [1]


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_a_validation_pass_every_step_does_not_set_the_batch(context):
    """A 256-row validation forward under no_grad before each 64-row training step: the
    report said batch 256 and samples/s 4x too high (the batch was read off the first pass
    of the micro-step), and its time was the step's forward time. A run that only evaluates
    still gets its batch, and its passes are its forward."""
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_batches, val = batches(6, b=64), torch.randn(256, D)
    evaluating = getattr(torch, context)
    with memprof.track(model, opt) as prof:
        for x, y in train_batches:
            with evaluating():
                model(val)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    t = prof.throughput
    assert t["batch_size"] == 64 and t["micro_steps_per_step"] == 1
    # the validation pass's time is evaluation, not the step's forward
    per = t["per_step"]
    assert all(e > 0 for e in per["eval_ms"])
    from rich.console import Console
    con = Console(record=True, width=200)
    prof.report(console=con)
    assert "evaluation (passes without gradients)" in con.export_text()
    with memprof.track(model) as inference:
        for _ in range(3):
            with evaluating():
                model(val)
            inference.step()
    assert inference.throughput["batch_size"] == 256
    # a step that only evaluates: its passes are its forward
    per = inference.throughput["per_step"]
    assert per["eval_ms"] == [0.0] * 3 and all(f > 0 for f in per["forward_ms"])


# ------------------------------------------------------------------ real loops
def test_slow_data_loader_is_found():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with memprof.track(model, opt) as prof:
        train(model, opt, batches(6), sleep=0.1)
    t = prof.throughput
    assert t["clock"] == "host" and t["steps"] == 6 and t["warmup_steps_excluded"] == 1
    assert t["per_step"]["data_ms"][0] is None
    assert all(d >= 99 for d in t["per_step"]["data_ms"][1:])
    # (on a loaded 2-core VM, waking up after the sleep can make the compute slow too)
    assert t["stats"]["data_fraction"]["median"] > 0.2
    f = [f for f in prof.findings if f.kind == "data_loader_starvation"]
    assert len(f) == 1 and f[0].severity == "warning"
    assert "1 warm-up step" in f[0].message and "20%" in f[0].message
    assert "num_workers" in f[0].fix and "pin_memory" in f[0].fix
    assert "persistent_workers" in f[0].fix and "prefetch_factor" in f[0].fix
    assert f[0].evidence["data_fraction_median"] > 0.2


def _loader_steps(waits_ms, step_ms=2.0):
    """Entries of steps that each wait `waits_ms[i]` inside DataLoader.__next__, then train
    for `step_ms` (forward, backward, optimizer), with 16 samples a step."""
    ms, t = 1_000_000, 0
    e = [("step", 0, 0)]
    for w in waits_ms:
        e += [("data_start", t, 0), ("data_end", t + int(w * ms), 0)]
        t += int(w * ms)
        part = int(step_ms * ms / 4)
        e += [("forward_start", t, 1), ("batch", None, 16), ("forward_end", t + part, 1),
              ("backward_start", t + part, 0), ("backward_end", t + 2 * part, 1),
              ("optimizer_start", t + 3 * part, 1), ("step", t + 4 * part, 1)]
        t += 4 * part
    return e


def test_a_data_loader_whose_workers_starve_the_loop_in_bursts_is_found():
    """Two workers, each making a batch in 100 ms, for a 2 ms step: batches come in pairs,
    every other step waits ~100 ms and the others ~0. The median step waits ~0: the finding
    came or not with noise, and the headline samples/s, the median of per-step rates, read
    3-12x the loop's rate (the overall rate is the headline now)."""
    waits = [0.1, 100.0] * 5 + [0.1]
    summary = tp.compute(_loader_steps(waits), clock="host")
    summary["loader_workers"] = 2
    measured = summary["steps_measured"]
    assert summary["stats"]["loader_ms"]["median"] < 2        # the median step: ~no wait
    wall = summary["totals"]["wall_ms"]
    assert summary["samples_per_s_overall"] == pytest.approx(16 * measured / (wall * 1e-3))
    assert summary["samples_per_s_overall"] < summary["stats"]["samples_per_s"]["median"] / 10
    f = tp.starvation_findings(summary)
    assert [x.kind for x in f] == ["data_loader_starvation"]
    assert "2 workers" in f[0].message and f[0].evidence["loader_fraction_total"] > 0.9
    # without workers (a loop descheduled now and then), or waits in too few steps: nothing
    summary["loader_workers"] = 0
    assert tp.starvation_findings(summary) == []
    rare = tp.compute(_loader_steps([0.1] * 10 + [400.0, 0.1]), clock="host")
    rare["loader_workers"] = 2
    assert tp.starvation_findings(rare) == []


def test_the_workers_of_a_data_loader_are_recorded():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(SlowBatches(batches(6), 0.01), batch_size=None,
                                         num_workers=2)
    with memprof.track(model, opt) as prof:
        train(model, opt, loader)
    t = prof.throughput
    assert t["loader_workers"] == 2 and t["data_loader_seen"]
    measured = t["steps_measured"] * 16    # the loop's rate: its samples over its time
    assert t["samples_per_s_overall"] == pytest.approx(
        measured / (t["totals"]["wall_ms"] * 1e-3), rel=1e-6)


def test_host_time_outside_a_data_loader_is_not_blamed_on_one():
    """Batches made with torch.randn and an EMA update after each step (issue 18): no
    DataLoader, so no data_loader_starvation; short waits get no finding at all."""
    model = make_model()
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with memprof.track(model, opt) as prof:
        for _ in range(8):
            x, y = torch.randn(16, D), torch.randint(0, C, (16,))
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                for e, p in zip(ema, model.parameters()):
                    e.mul_(0.99).add_(p, alpha=0.01)
    assert not [f for f in prof.findings if f.kind in ("data_loader_starvation",
                                                        "host_time_between_steps")]
    assert prof.throughput["data_loader_seen"] is False


def test_long_host_work_between_steps_is_named_for_what_it_is():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with memprof.track(model, opt) as prof:
        for x, y in batches(5):
            time.sleep(0.05)            # the loop's own work, no DataLoader
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    kinds = [f.kind for f in prof.findings]
    assert "data_loader_starvation" not in kinds and "host_time_between_steps" in kinds


def test_tight_loop_is_not_starved():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = [(torch.randn(128, 256), torch.randint(0, 10, (128,))) for _ in range(8)]
    with memprof.track(model, opt) as prof:
        for x, y in data:
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    t = prof.throughput
    assert not [f for f in prof.findings if f.kind == "data_loader_starvation"]
    assert t["stats"]["data_fraction"]["median"] < 0.2
    s = t["stats"]
    assert s["forward_ms"]["median"] > 0 and s["backward_ms"]["median"] > 0
    assert s["optimizer_ms"]["median"] > 0
    assert t["micro_steps_per_step"] == 1 and not t["gradient_accumulation"]
    assert t["batch_size"] == 128
    assert s["samples_per_s"]["median"] == pytest.approx(
        128 / (s["wall_ms"]["median"] * 1e-3), rel=1e-9)  # odd step count: same median


@pytest.mark.parametrize("accum", [1, 4])
def test_gradient_accumulation_is_detected(accum):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with memprof.track(model, opt) as prof:
        train(model, opt, batches(4 * accum, b=12), accum=accum)
    t = prof.throughput
    assert t["steps"] == 4
    assert t["per_step"]["micro_steps"] == [accum] * 4
    assert t["micro_steps_per_step"] == accum
    assert t["gradient_accumulation"] is (accum > 1)
    assert t["per_step"]["samples"] == [12 * accum] * 4
    assert t["batch_size"] == 12


def test_an_epochs_short_last_step_shows_as_the_micro_steps_range(capsys):
    """Accumulation of 4 over epochs of 10 batches, the optimizer stepping at each epoch's
    end too: steps of 4, 4, 2 micro-steps. The summary said "4" alone (the median)."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with memprof.track(model, opt) as prof:
        for _ in range(3):   # epochs
            data = batches(10, b=12)
            for i, (x, y) in enumerate(data):
                (torch.nn.functional.cross_entropy(model(x), y) / 4).backward()
                if (i + 1) % 4 == 0 or i + 1 == len(data):
                    opt.step()
                    opt.zero_grad()
    t = prof.throughput
    assert t["per_step"]["micro_steps"] == [4, 4, 2] * 3
    assert t["micro_steps_per_step"] == 4 and t["micro_steps_range"] == [2, 4]
    memprof.show(prof)
    assert "micro-steps per optimizer step 4 (2-4 by step) (gradient accumulation)" in \
        capsys.readouterr().out.replace("\n", " ")


def test_batch_size_from_kwargs_dict_and_override():
    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(D, C)

        def forward(self, batch, scale=1.0):
            return self.fc(batch["x"]) * scale

    torch.manual_seed(0)
    model = DictModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for override, expect in ((None, 6), (32, 32)):
        with memprof.track(model, opt, batch_size=override) as prof:
            for _ in range(3):
                model(batch={"x": torch.randn(6, D)}).sum().backward()
                opt.step()
                opt.zero_grad()
        t = prof.throughput
        assert t["per_step"]["samples"] == [expect] * 3
        assert t["batch_size_source"].startswith("track(" if override else "leading")
    with pytest.raises(ValueError, match="batch_size"):
        memprof.track(model, batch_size=0)


def test_manual_steps_and_auto_modules():
    model = make_model()
    data = batches(6, b=5)
    with memprof.track(auto_modules=True) as prof:
        for i, (x, y) in enumerate(data):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if i % 2 == 1:
                prof.step()
    t = prof.throughput
    assert t["per_step"]["micro_steps"] == [2, 2, 2]
    assert t["per_step"]["samples"] == [10, 10, 10]
    assert t["per_step"]["optimizer_ms"] == [0.0, 0.0, 0.0]


def test_summary_is_saved_and_recomputable(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with memprof.track(model, opt, path=str(tmp_path / "r.memprof")) as prof:
        train(model, opt, batches(5))
    loaded = memprof.load(str(tmp_path / "r.memprof"))
    assert tp.summarize(loaded) == prof.throughput
    assert memprof.analyse.summary(prof)["throughput"]["steps"] == 5
    assert loaded.throughput == prof.throughput    # (a loaded profile had no .throughput)
    again = tp.summarize(loaded, warmup=0)          # recomputed from the markers
    assert again["warmup_steps_excluded"] == 0 and again["steps_measured"] == 5
    assert again["per_step"]["micro_steps"] == prof.throughput["per_step"]["micro_steps"]


def _report_text(**train_options) -> str:
    """The terminal report of 4 tracked batches of 8, its lines joined (a title wraps at its
    table's width)."""
    from rich.console import Console
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with memprof.track(model, opt) as prof:
        train(model, opt, batches(4, b=8), **train_options)
    con = Console(record=True, width=160)
    prof.report(console=con)
    return " ".join(con.export_text().split())


def test_report_has_a_throughput_table():
    text = _report_text(accum=2)
    assert "Throughput per optimizer step" in text and "1 warm-up step(s) excluded" in text
    assert "micro-steps per optimizer step 2 (gradient accumulation)" in text
    # no DataLoader: the time before the forward is the loop's own, not a wait for data
    assert "before forward (no DataLoader)" in text and "data wait" not in text


def test_the_data_loaders_wait_is_its_own_row_beside_the_loops_host_work():
    """Under a DataLoader, the time before the forward also holds the loop's own host work
    (logging, a sleep after the step): a run read "data wait 47 ms" where its starvation
    finding said 36. The DataLoader's wait is a row of its own, the finding's number."""
    from rich.console import Console
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(SlowBatches(batches(6, b=8), 0.01), batch_size=None)
    with memprof.track(model, opt) as prof:
        for x, y in loader:
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            time.sleep(0.01)                       # host work of the loop's own
    con = Console(record=True, width=160)
    prof.report(console=con)
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in con.export_text().splitlines() if line.count("│") >= 5}
    st = tp.summarize(prof)["stats"]
    assert "data wait" not in rows and "no DataLoader" not in " ".join(rows)
    assert rows["before forward (data, host work)"] == f"{st['data_ms']['median']:.2f}"
    assert rows["of it: waiting for the DataLoader"] == f"{st['loader_ms']['median']:.2f}"
    assert st["data_ms"]["median"] >= st["loader_ms"]["median"] + 8   # the 10 ms sleep
    assert st["loader_ms"]["median"] >= 8                            # the 10 ms fetch


def test_micro_batches_of_different_sizes_show_their_range():
    """Micro-batches of 32 and 64 in every step: the median micro-batch is 48, a size no
    micro-step had; the report says it is a median and gives the sizes (it read "batch 48")."""
    from rich.console import Console
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mixed = [pair for a, b in zip(batches(4, b=32), batches(4, b=64, seed=2)) for pair in (a, b)]
    with memprof.track(model, opt) as prof:
        train(model, opt, mixed, accum=2)
    t = prof.throughput
    assert t["batch_size"] == 48 and t["batch_size_range"] == [32, 64]
    con = Console(record=True, width=200)
    prof.report(console=con)
    assert "batch 48 (median; sizes 32-64)" in con.export_text()
    with memprof.track(model, opt) as same:
        train(model, opt, batches(4, b=8), accum=2)
    assert same.throughput["batch_size_range"] == [8, 8]
    con = Console(record=True, width=200)
    same.report(console=con)
    assert "batch 8   samples/s" in con.export_text()


def test_batch_size_past_an_argument_that_holds_only_a_scalar():
    """`model({"scale": tensor(2.)}, x)`: the first argument's first tensor is 0-d, so the
    batch is the next argument's (a rewrite had stopped there: no batch, no samples/s)."""
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(D, C)

        def forward(self, opts, x):
            return self.fc(x) * opts["scale"]

    model = Scaled()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt) as prof:
        for _ in range(3):
            model({"scale": torch.tensor(2.0)}, torch.randn(32, D)).sum().backward()
            opt.step()
            opt.zero_grad()
    assert prof.throughput["batch_size"] == 32
    lead = throughput_recorder.leading_dim
    assert lead((torch.randn(5, 2),)) == 5 and lead((torch.tensor(1.0), torch.randn(4))) is None
    assert lead(([torch.tensor(1.0), torch.randn(9)], torch.randn(7))) == 7
    assert lead((), {"input_ids": torch.zeros(3, 8)}) == 3 and lead(("text",)) is None


def test_removed_on_exit_and_on_exception():
    from torch.optim import optimizer as optmod
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    original = torch.autograd.backward
    with pytest.raises(RuntimeError, match="boom"):
        with memprof.track(model, opt):
            train(model, opt, batches(2))
            raise RuntimeError("boom")
    assert torch.autograd.backward is original
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    assert not optmod._global_optimizer_pre_hooks and not optmod._global_optimizer_post_hooks


# ------------------------------------------------------------------ the CUDA path, simulated
class FakeEvent:
    """torch.cuda.Event stand-in on the host clock (the recorder's logic, not CUDA, is tested)."""

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self, stream=None):
        self.t = time.monotonic_ns()

    def query(self):
        return True

    def elapsed_time(self, other):
        return (other.t - self.t) / 1e6


def fake_pynvml(calls):
    util = types.SimpleNamespace(gpu=57, memory=21)
    mem = types.SimpleNamespace(used=3 << 30, total=16 << 30)
    return types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetHandleByPciBusId=lambda bus: "h",
        nvmlDeviceGetHandleByIndex=lambda i: "h",
        nvmlDeviceGetUtilizationRates=lambda h: util,
        nvmlDeviceGetMemoryInfo=lambda h: mem)


def test_cuda_event_path_and_gpu_sampler_simulated(monkeypatch):
    calls = []
    monkeypatch.setattr(throughput_recorder, "_params_on_cuda", lambda params: True)
    monkeypatch.setattr(throughput_recorder, "_cuda_device_index", lambda params: 0)
    monkeypatch.setattr(throughput_recorder, "_CUDA_FLUSH_EVERY", 4)   # exercise the non-blocking batches
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(calls))
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with memprof.track(model, opt) as prof:
        tracker = prof
        # (6 steps and a manual one: the leak looks' steps 2 and 4 are left out on the CUDA
        # clock, the first is warm-up; a wait is judged over 3 measured steps or more)
        train(model, opt, batches(12, b=4), accum=2, sleep=0.1)
        model(torch.randn(4, D)).sum().backward()
        prof.step()  # a manual boundary goes through the wrapped _end_step too
    assert "_end_step" not in tracker.__dict__
    assert not [t for t in threading.enumerate() if t.name == "memprof-gpu-sampler"]
    assert calls[0] == "init" and calls[-1] == "shutdown"
    t = prof.throughput
    assert t["clock"] == "cuda_events"
    assert t["per_step"]["micro_steps"] == [2] * 6 + [1]
    assert t["per_step"]["samples"] == [8] * 6 + [4]
    assert all(d >= 199 for d in t["per_step"]["data_ms"][1:4])   # 2 x 100 ms per step
    assert t["gpu"]["samples"] >= 1 and t["gpu"]["utilization_pct"]["median"] == 57
    assert t["gpu"]["memory_used_bytes_max"] == 3 << 30
    f = [f for f in prof.findings if f.kind == "data_loader_starvation"]
    assert f and "CUDA events" in f[0].message


def test_gpu_sampler_without_pynvml_reports_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)   # import fails
    s = GpuSampler(0)
    s.start()
    s.stop()
    assert s.summary()["samples"] == 0 and "pynvml unavailable" in s.summary()["error"]


@pytest.mark.gpu
def test_cuda_events_on_a_gpu():
    model = make_model().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = [(x.cuda(), y.cuda()) for x, y in batches(8)]
    with memprof.track(model, opt) as prof:
        train(model, opt, data, sleep=0.03)
    t = prof.throughput
    assert t["clock"] == "cuda_events"
    assert all(d >= 25 for d in t["per_step"]["data_ms"][1:])
    assert any(f.kind == "data_loader_starvation" for f in prof.findings)
    pytest.importorskip("pynvml")
    assert t["gpu"]["samples"] >= 1 and not t["gpu"].get("error")
    assert not [th for th in threading.enumerate() if th.name == "memprof-gpu-sampler"]


def test_two_optimizers_one_tracked_model():
    """A GAN tracked by its generator: every other optimizer step (the discriminator's) runs
    no pass of it, and the median read '0 micro-steps per optimizer step' beside a samples/s."""
    torch.manual_seed(0)
    gen, disc = make_model(), torch.nn.Sequential(torch.nn.Linear(C, 1))
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.01)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.01)
    with memprof.track(gen) as prof:
        for x, _ in batches(8, b=16):
            fake = gen(x)
            disc(fake).mean().backward()         # the generator's step
            opt_g.step()
            opt_g.zero_grad()
            opt_d.zero_grad()
            disc(fake.detach()).mean().backward()   # the discriminator's
            opt_d.step()
            opt_d.zero_grad()
    t = prof.throughput
    assert t["micro_steps_per_step"] == 1 and t["batch_size"] == 16
    assert 0 < t["steps_with_micro_steps"] < t["steps_measured"]


@pytest.mark.parametrize("reentrant", [True, False])
def test_the_whole_model_under_checkpoint_is_a_training_pass(reentrant):
    """`checkpoint(model, x)` of the whole model: the reentrant form runs the model inside an
    autograd Function's forward, without gradients, so the pass read as an evaluation (no
    training batch, no samples/s, its time the evaluation's)."""
    from torch.utils.checkpoint import checkpoint
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt) as prof:
        for x, y in batches(4, b=32):
            x.requires_grad_(True)   # the reentrant form needs an input that wants a gradient
            out = checkpoint(model, x, use_reentrant=reentrant)
            torch.nn.functional.cross_entropy(out, y).backward()
            opt.step()
            opt.zero_grad()
    t = prof.throughput
    assert t["batch_size"] == 32 and t["micro_steps_per_step"] == 1
    per = t["per_step"]
    assert not any(per.get("eval_ms") or ()), per.get("eval_ms")
    assert all(f > 0 for f in per["forward_ms"])


def test_a_torch_func_grad_loop_without_steps_is_told_how_to_mark_them():
    """torch.func.grad over functional_call: the parameters it takes gradients for are copies
    made for the call, so neither a backward() nor their change is seen - the run read "steps
    1" with no throughput and no word why."""
    from rich.console import Console
    from torch.func import functional_call, grad

    model = make_model()

    def loss_fn(params, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    def run(mark: bool):
        with memprof.track(model) as prof:
            for x, y in batches(4):
                params = {k: v.detach() for k, v in model.named_parameters()}
                grads = grad(loss_fn)(params, x, y)
                with torch.no_grad():
                    for k, p in model.named_parameters():
                        p.sub_(0.01 * grads[k])
                if mark:
                    prof.step()
        con = Console(record=True, width=200)
        prof.report(console=con)
        return prof, con.export_text()

    prof, text = run(mark=False)
    assert len(prof.steps) == 1
    assert "4 gradient passes ran without a step boundary" in text and "prof.step()" in text
    prof, text = run(mark=True)
    assert len(prof.steps) == 4 and "without a step boundary" not in text


def test_one_real_step_over_accumulated_micro_batches_is_no_unmarked_run():
    from memprof.analyse.throughput import unmarked_steps
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with memprof.track(model, opt) as prof:
        for x, y in batches(4):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert unmarked_steps(prof.profile) is None


def test_a_run_of_one_step_is_measured_on_it_and_says_so():
    """One step (a smoke test; the README's OOM example, which fails in its second) printed
    "median over 0 steps", an empty table and "batch size unknown" with the batch known."""
    from rich.console import Console
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with memprof.track(model, opt) as prof:
        train(model, opt, batches(1, b=8))
    summary = tp.summarize(prof)
    assert summary["steps_measured"] == 1 and summary["warmup_measured"]
    assert summary["batch_size"] == 8 and summary["samples_per_s_overall"] > 0
    assert summary["stats"]["wall_ms"]["median"] > 0
    assert not tp.starvation_findings(summary)            # first-step costs are no finding
    con = Console(record=True, width=200)
    prof.report(console=con)
    text = " ".join(con.export_text().split())
    assert "median over 1 step, warm-up only: first-step costs" in text
    assert "batch size unknown" not in text and "batch 8 samples/s" in text
    with memprof.track(model, opt) as prof:                 # two steps: the first is warm-up
        train(model, opt, batches(2, b=8))
    summary = tp.summarize(prof)
    assert summary["steps_measured"] == 1 and not summary["warmup_measured"]
    assert summary["warmup_steps_excluded"] == 1
