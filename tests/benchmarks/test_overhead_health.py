"""benchmarks/overhead_health.py's derived overhead: the twin it divides by must run the same
ops as the workload it stands for, and the arithmetic is the one the table says."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

import memprof
from benchmark_scripts import BENCHMARKS, load

overhead_health = load("overhead_health")


def test_derived_rows_divide_the_twins_added_time_by_the_big_step_of_the_same_round():
    modes = overhead_health.MODES
    per_round = {
        # the big workload's modes differ: only its untracked step may be the divisor
        "big": {m: [0.100 + i, 0.200 + i, 0.050 + i] for i, m in enumerate(modes)},
        "twin": {m: [0.010, 0.010, 0.010] for m in modes},
    }
    per_round["big"]["untracked"] = [0.100, 0.200, 0.050]
    per_round["twin"]["track(health=False)"] = [0.0105, 0.014, 0.011]   # +0.5, +4, +1 ms
    rows = {r["mode"]: r for r in overhead_health.derived_rows("big", "twin", per_round)}
    track = rows["track(health=False)"]
    # per round: 0.5/100, 4/200, 1/50 ms -> 0.5 %, 2 %, 2 %: the median of rounds is 2 %
    # (pooled medians would give 1 ms / 100 ms = 1 %)
    assert track["derived_pct"] == pytest.approx(2.0)
    assert track["p10_pct"] == pytest.approx(0.5) and track["p90_pct"] == pytest.approx(2.0)
    assert track["twin_added_us"] == pytest.approx(1000.0)
    assert track["big_untracked_ms"] == pytest.approx(100.0)
    assert rows["torch.profiler(profile_memory)"]["derived_pct"] == pytest.approx(0.0)
    assert "untracked" not in rows


def test_parse_workload_reads_constructor_keywords():
    assert overhead_health.parse_workload("mlp:4:in_features=16;hidden=32") == \
        ("mlp", 4, {"in_features": 16, "hidden": 32})
    assert overhead_health.parse_workload("mlp:64") == ("mlp", 64, {})


def test_a_run_with_a_twin_records_the_same_events_per_step_and_prints_the_derived_table(
        tmp_path, monkeypatch):
    out = tmp_path / "oh"
    active_in = {}   # mode -> whether memprof's native hooks were on during its steps
    mode_now = []    # the mode run_mode is running (none during the warm-up steps)
    run_steps, run_mode = overhead_health.run_steps, overhead_health.run_mode

    def noting_run_mode(mode, *args, **kwargs):
        mode_now[:] = [mode]
        return run_mode(mode, *args, **kwargs)

    def noting_run_steps(*args):
        if mode_now:
            active_in.setdefault(mode_now[0], memprof._C.is_active())
        return run_steps(*args)
    monkeypatch.setattr(overhead_health, "run_mode", noting_run_mode)
    monkeypatch.setattr(overhead_health, "run_steps", noting_run_steps)
    rows = overhead_health.main([
        "--workloads", "mlp:3:in_features=12;hidden=16", "--twin", "mlp:2:in_features=4;hidden=4",
        "--rounds", "1", "--steps", "3", "--warmup", "1",
        "--out", str(out)])
    events = {r["workload"]: r["events_per_step"] for r in rows
              if r["mode"] == "track(health=False)"}
    assert all(r["events_per_step"] is None for r in rows if r["mode"] != "track(health=False)")
    assert len(events) == 2
    # The A/A control runs untracked, and so do PyTorch's hook points alone, with the native
    # hooks on (run_mode checks that they recorded nothing): nothing to leave, no events.
    for mode in (overhead_health.CONTROL, overhead_health.HOOK_POINTS):
        same = [r for r in rows if r["mode"] == mode]
        assert len(same) == 2 and all(r["exit_ms"] == 0.0 for r in same)
    assert active_in == {"untracked": False, overhead_health.CONTROL: False,
                         overhead_health.HOOK_POINTS: True, "track(health=False)": True,
                         "track(health=True)": True, "torch.profiler(profile_memory)": False}
    big, twin = events.values()
    assert big > 0 and big == twin     # the same ops: allocations and frees one for one
    assert all(isinstance(r["faults_per_step"], float)
               and len(r["faults_per_step_each_round"]) == 1 for r in rows)
    text = (tmp_path / "oh.txt").read_text()
    assert "derived lower bound of mlp b3 (in_features=12, hidden=16)'s overhead" in text and "twin added us" in text
    assert "faults/step" in text and "heap: default" in text
    assert overhead_health.CONTROL in text and overhead_health.HOOK_POINTS in text
    saved = json.loads((tmp_path / "oh.json").read_text())
    assert all("faults_per_step" in r for r in saved["rows"])
    assert [d["mode"] for d in saved["derived"]] == list(overhead_health.DEFAULT_MODES[1:])


_FAULTS_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import overhead_health, torch
torch.set_num_threads(1)
if sys.argv[2] == "steady":
    overhead_health.set_heap_thresholds(1 << 30)
else:   # a heap that returns big blocks every time (glibc's own thresholds move with the
    # heap's layout: whether megabyte blocks are re-mapped each round varies from run to run)
    overhead_health.set_heap_thresholds(128 << 10)
def churn():   # 16 MB in fresh 1 MB blocks (under a huge page: 4 KB pages either way),
    blocks = [torch.ones(1 << 18) for _ in range(16)]    # filled, then freed
    del blocks
for _ in range(3):
    churn()
before = overhead_health.minor_faults()
for _ in range(10):
    churn()
print((overhead_health.minor_faults() - before) / 10)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="--heap steady is glibc's mallopt")
def test_the_steady_heap_stops_big_blocks_from_faulting_fresh_pages_in():
    """What --heap steady is for: freed megabyte blocks stay mapped, so refilling them costs
    no page faults (a heap that returns them faults ~4,000 pages per round; glibc's default
    does so in some runs and not in others). Each in a fresh process: mallopt holds for the
    life of a process."""
    faults = {}
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    for heap in ("returning", "steady"):
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, BENCHMARKS, heap],
                             capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        faults[heap] = float(out.stdout.strip().splitlines()[-1])
    assert faults["returning"] > 1000, faults   # 16 MB = 4,096 pages, re-faulted each round
    assert faults["steady"] < 50, faults


def test_merge_parts_keeps_each_round_beside_the_same_round_of_every_mode_and_workload():
    def part(tag):   # one process's figures: two rounds of two modes of two workloads
        return {"per_round": {w: {m: [f"{tag}{w}{m}{r}" for r in (0, 1)] for m in "ab"}
                              for w in "xy"},
                "events": {w: [f"{tag}{w}e"] for w in "xy"}}
    merged = overhead_health.merge_parts([part("p"), part("q")])
    assert merged["per_round"]["x"]["b"] == ["pxb0", "pxb1", "qxb0", "qxb1"]
    assert merged["per_round"]["y"]["a"] == ["pya0", "pya1", "qya0", "qya1"]
    assert merged["events"] == {"x": ["pxe", "qxe"], "y": ["pye", "qye"]}


def test_processes_pool_fresh_processes_rounds_in_alternating_order(tmp_path, monkeypatch):
    """--processes 2: each child runs main's own arguments (not the caller's command line),
    rounds numbered on so that the order alternates across processes as within one, and each
    process's paired figure is printed and saved."""
    commands = []
    run = overhead_health.subprocess.run

    def noting_run(cmd, **kwargs):
        if len(cmd) > 1 and str(cmd[1]).endswith("overhead_health.py"):   # not git, uname
            commands.append(cmd)
        return run(cmd, **kwargs)
    monkeypatch.setattr(overhead_health.subprocess, "run", noting_run)
    out = tmp_path / "oh"
    argv = ["--workloads", "mlp:2:in_features=4;hidden=4", "--rounds", "1", "--steps", "2",
            "--warmup", "1", "--processes", "2", "--out", str(out)]
    rows = overhead_health.main(argv)
    assert len(commands) == 2
    for i, cmd in enumerate(commands):
        assert cmd[2:2 + len(argv)] == argv
        assert cmd[cmd.index("--processes", 2 + len(argv)) + 1] == "1"
        assert cmd[cmd.index("--round-offset") + 1] == str(i)   # round 0 forward, 1 reversed
    assert {r["steps"] for r in rows} == {2}   # 1 kept step x 1 round x 2 processes
    saved = json.loads((tmp_path / "oh.json").read_text())
    each = saved["paired_pct_each_process"]["mlp:2:in_features=4;hidden=4"]
    assert set(each) == set(overhead_health.DEFAULT_MODES[1:]) and \
        all(len(v) == 2 for v in each.values())
    text = (tmp_path / "oh.txt").read_text()
    assert "2 rounds in 2 processes" in text and "each process's paired overhead" in text


def test_modes_runs_only_the_chosen_modes_with_untracked_first(tmp_path, monkeypatch):
    """--modes: a split run (e.g. track against the hook points alone, without torch.profiler
    in the same process) runs those modes and untracked, which every figure is paired with,
    in the table's order; the health recorder's separate timing rounds only with its mode."""
    ran = []
    run_mode = overhead_health.run_mode

    def noting_run_mode(mode, *args, **kwargs):
        ran.append((mode, args[1] if len(args) > 1 else kwargs.get("hook_ms")))
        return run_mode(mode, *args, **kwargs)
    monkeypatch.setattr(overhead_health, "run_mode", noting_run_mode)
    rows = overhead_health.main([
        "--workloads", "mlp:2:in_features=4;hidden=4", "--rounds", "2", "--steps", "2",
        "--warmup", "1", "--modes", "hook points only, track(health=False)",
        "--out", str(tmp_path / "oh")])
    order = ["untracked", "track(health=False)", overhead_health.HOOK_POINTS]
    assert [m for m, _ in ran] == order + order[::-1]   # round 1 runs them reversed
    assert all(hook_ms is None for _, hook_ms in ran)
    assert [r["mode"] for r in rows] == order
    text = (tmp_path / "oh.txt").read_text()
    assert "torch.profiler" not in text and "track(health=True)" not in text


def test_an_unknown_mode_is_refused_in_one_line_naming_it():
    with pytest.raises(SystemExit) as err:
        overhead_health.main(["--modes", "track(health=False),tracked", "--out", "/dev/null"])
    message = str(err.value)
    assert "'tracked'" in message and "track(health=False)" in message and "\n" not in message


def test_native_recording_only_records_events_without_the_python_hooks(monkeypatch):
    """The native mode (asked for by name, not in the default run) splits memprof's time:
    its steps run with memprof's native recording on (events recorded) and none of its Python
    hooks (Module.__call__ is torch's own), so track() minus it is the Python hooks' share."""
    import torch
    assert overhead_health.NATIVE not in overhead_health.DEFAULT_MODES
    assert overhead_health.selected_modes(None) == overhead_health.DEFAULT_MODES
    assert overhead_health.selected_modes(overhead_health.NATIVE) == \
        ("untracked", overhead_health.NATIVE)
    seen = {}
    run_steps = overhead_health.run_steps

    def noting_run_steps(*args):
        seen["call"] = torch.nn.Module.__call__
        out = run_steps(*args)
        seen["active"] = memprof._C.is_active()
        seen["records"] = memprof._C.counters()["records"]   # this session's, before it stops
        return out
    monkeypatch.setattr(overhead_health, "run_steps", noting_run_steps)
    own_call = torch.nn.Module.__call__
    times, faults, exit_s = overhead_health.run_mode(
        overhead_health.NATIVE, overhead_health.workload("mlp", 2, 3, {"in_features": 4,
                                                                          "hidden": 4}))
    assert seen["active"] and seen["call"] is own_call and seen["records"] > 0
    assert len(times) == 3 and exit_s == 0.0 and not memprof._C.is_active()
