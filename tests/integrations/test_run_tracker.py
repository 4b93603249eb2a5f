"""What both framework callbacks share (memprof.integrations._common), without a framework:
the rank file a run is saved to before torch.distributed is initialised, and the live peak that
goes to the framework's logs, followed incrementally through the native event log."""
from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from memprof.integrations import _common
from memprof.integrations._common import LivePeak, RunTracker
from memprof.record.events import DEVICE_CPU, EVENT_DTYPE, KIND_MEMORY


def _train_steps(model, opt, steps: int, batch: int) -> None:
    for _ in range(steps):
        model(torch.randn(batch, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _run_once(out_dir, name: str = "train") -> RunTracker:
    model, opt = _model_and_optimizer()
    run = RunTracker(str(out_dir), name, {})
    run.start(model, opt, {"model": model})
    path_while_running = run.path
    _train_steps(model, opt, 2, 8)
    run.stop()
    assert run.path == path_while_running   # the file the callback announced is the one saved
    return run


# ------------------------------------------------------------------ the rank's file
@pytest.fixture
def torchrun_env_before_init(monkeypatch):
    """What torchrun sets for rank 1 of 2, with no process group initialised yet (a Trainer
    callback built before the framework calls init_process_group)."""
    for key, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(key, value)
    assert not torch.distributed.is_initialized()


def test_callback_run_before_init_writes_the_rank_file(torchrun_env_before_init, tmp_path):
    first = _run_once(tmp_path)
    assert first.path == str(tmp_path / "train.rank1.memprof")
    assert first.profile.meta["rank"] == 1 and first.profile.meta["world_size"] == 2
    second = _run_once(tmp_path)   # a later run in the same directory keeps the first's file
    assert second.path == str(tmp_path / "train-1.rank1.memprof")
    assert sorted(os.listdir(tmp_path)) == ["train-1.rank1.memprof", "train.rank1.memprof"]


def test_outside_a_job_the_file_has_no_rank(monkeypatch, tmp_path):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert _run_once(tmp_path, "fit").path == str(tmp_path / "fit.memprof")


# ------------------------------------------------------------------ the live peak
def test_live_peak_per_window_equals_the_full_recomputation(tmp_path):
    """Windows of different sizes (one empty, one with a second thread's work): each figure
    equals the peak that the saved profile's whole timeline gives for the same window."""
    model, opt = _model_and_optimizer()
    run = RunTracker(str(tmp_path), "train", {})
    run.start(model, opt, {"model": model})
    kept = []

    def other_thread():
        kept.append(torch.randn(1000, 100))   # 400 kB, alive past the window
        torch.randn(2000, 100).sum()          # 800 kB, freed inside it

    windows = [lambda: _train_steps(model, opt, 1, 8),
               lambda: _train_steps(model, opt, 3, 64),
               lambda: None,                                  # nothing happened
               lambda: (kept.append(torch.randn(50_000)), _train_steps(model, opt, 1, 8)),
               lambda: _run_thread(other_thread),
               lambda: (kept.clear(), _train_steps(model, opt, 2, 32))]
    ends, reported = [], []
    for work in windows:
        work()
        ends.append(time.monotonic_ns())   # the native event clock; no torch op after this
        reported.append(run.step_peak())
    run.stop()
    prof = run.profile
    t, live = prof.memory["t_ns"], prof.live_bytes()
    expected, at_end, start = [], [], 0
    for end_ns in ends:
        stop = int(np.searchsorted(t, end_ns, side="right"))
        before = int(live[start - 1]) if start else int(live[0])
        expected.append(max([before] + live[start:stop].tolist()))
        at_end.append(int(live[stop - 1]))
        start = stop
    assert reported == expected
    assert reported[2] == at_end[1]                                # the empty window
    assert reported[4] >= at_end[3] + (1000 + 2000) * 100 * 4     # the other thread's blocks


def _run_thread(fn) -> None:
    worker = threading.Thread(target=fn)
    worker.start()
    worker.join()


def _log(*records) -> bytes:
    """A native-log stand-in: (thread, t_ns, ptr, size) memory events, grouped by thread in
    registration order as the native drain lays them out."""
    out = np.zeros(len(records), dtype=EVENT_DTYPE)
    for row, (thread, t_ns, ptr, size) in zip(out, sorted(records, key=lambda r: r[0])):
        row["thread"], row["t_ns"], row["ptr"], row["size"] = thread, t_ns, ptr, size
        row["kind"], row["device_type"] = KIND_MEMORY, DEVICE_CPU
    return out.tobytes()


def test_a_record_published_after_a_later_threads_is_still_counted(monkeypatch):
    """Thread 0 allocated C at t=15 but published it after the drain that already saw thread
    1's B at t=20: the next call counts C (a cursor per thread, not a time filter), and its
    free later brings the live bytes back down."""
    logs = [_log((0, 10, 0xA0, 100), (1, 20, 0xB0, 1000)),
            _log((0, 10, 0xA0, 100), (0, 15, 0xC0, 10_000), (1, 20, 0xB0, 1000)),
            _log((0, 10, 0xA0, 100), (0, 15, 0xC0, 10_000), (1, 20, 0xB0, 1000),
                 (1, 30, 0xC0, -10_000))]

    def events(since=()):
        """The native drain: each thread's log in order, without its first since[i] records."""
        log = np.frombuffer(logs.pop(0), dtype=EVENT_DTYPE)
        keep = np.ones(log.size, dtype=bool)
        for tid, n in enumerate(since):
            keep[np.flatnonzero(log["thread"] == tid)[:n]] = False
        return log[keep].tobytes()

    native = SimpleNamespace(DEVICE_CPU=DEVICE_CPU, events=events)
    monkeypatch.setattr(_common, "_C", native)
    peak = LivePeak(SimpleNamespace(session=SimpleNamespace(outer=None, snapshots=SimpleNamespace(
        baseline=[(0x50, 7, DEVICE_CPU, -1, 0)]))), torch.device("cpu"))
    assert peak() == 7 + 100 + 1000
    assert peak() == 7 + 100 + 1000 + 10_000
    assert peak() == 7 + 100 + 1000 + 10_000 and peak.live == 7 + 100 + 1000


def test_a_script_that_raises_past_the_framework_saves_its_own_error(tmp_path):
    """No framework callback runs when training raises past it (a Trainer without an
    exception hook): the run is finished at exit and said "RuntimeError: the process exited
    during training"; the script's own exception is the one to name."""
    import subprocess
    import sys
    import textwrap
    script = tmp_path / "raises.py"
    script.write_text(textwrap.dedent(f'''
        import torch
        from memprof.integrations._common import RunTracker
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run = RunTracker({str(tmp_path)!r}, "train", {{}})
        run.start(model, opt, {{"model": model}})
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        raise ValueError("bad batch at call 5")
    '''))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "ValueError: bad batch at call 5" in r.stderr
    import memprof
    assert memprof.load(str(tmp_path / "train.memprof")).meta["error"] == \
        "ValueError: bad batch at call 5"


def test_live_peak_inside_another_block_is_the_same(tmp_path):
    """A callback's run inside another block (a Trainer script under `memprof run`): the
    logged peaks counted the model's parameters twice (in the block's baseline and again in
    the outer block's records)."""
    import memprof

    def peaks(name: str) -> list[int]:
        model, opt = _model_and_optimizer()
        run = RunTracker(str(tmp_path), name, {})
        run.start(model, opt, {"model": model})
        out = []
        for batch in (8, 64, 8):
            _train_steps(model, opt, 1, batch)
            out.append(run.step_peak())
        run.stop()
        return out

    alone = peaks("alone")
    with memprof.track():                  # the model is made inside the outer block
        nested = peaks("nested")
    assert nested == alone and min(alone) > 0


@pytest.mark.parametrize("kwargs,says", [
    ({"helth": True}, "helth"),                         # a misspelt option
    ({"capacity": -1}, "capacity=-1"),
    ({"step_on": "sometimes"}, "sometimes"),
    ({"autosave": "often"}, "autosave='often'"),
    ({"budget": "v99-1gb"}, "v99-1gb"),
])
def test_a_bad_option_fails_when_the_callback_is_made(tmp_path, kwargs, says):
    # the callback is made before the model, the data and the framework load; a bad option
    # failed only when training began, minutes later
    with pytest.raises((TypeError, ValueError)) as err:
        RunTracker(str(tmp_path), "train", kwargs)
    message = str(err.value)
    assert says in message and "\n" not in message
    assert os.listdir(tmp_path) == []   # nothing made for a callback that is refused


def test_a_misspelt_option_names_the_ones_there_are(tmp_path):
    with pytest.raises(TypeError, match=r"MemprofCallback: helth=.*no option of memprof.track"
                                        r".*health"):
        RunTracker(str(tmp_path), "train", {"helth": True})


def test_analyses_given_as_a_generator_run_in_every_run(tmp_path):
    # the option check read the generator to its end: the run itself got no analyses and no
    # findings, with no word
    from memprof.analyse import default_analyses
    run = RunTracker(str(tmp_path), "train", {"analyses": (f for f in default_analyses())})
    assert len(run.track_kwargs["analyses"]) == len(default_analyses())
    for _ in range(2):   # a second fit() with the same callback reads them again
        model, opt = _model_and_optimizer()
        kept = []
        run.start(model, opt, {"model": model})
        for _ in range(3):
            loss = model(torch.randn(8, 16)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            kept.append(loss)   # a retained graph: the analyses find it
        run.stop()
        assert [f.kind for f in run.profile.findings if f.kind == "retained_graph"]
