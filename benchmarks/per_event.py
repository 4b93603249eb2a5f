"""Cost per allocator event: inside a tracked block, and to leave it (build the Profile).

    python benchmarks/per_event.py [--events 300000] [--rounds 5]

The workload is a loop of `torch.empty(16)` (one allocation and one free per iteration, nothing
else), so the difference to the untracked loop is the recording cost per event. Measured in one
run, rounds interleaved (this machine's timings swing 2-3x): untracked, memprof.track (inside the
block, and the exit: draining the native log, building the Run and Profile, the analyses), and
torch.profiler(profile_memory=True) (inside, and its exit: building its event list, which is when
it pays for what it recorded); on a GPU also torch.cuda.memory._record_memory_history.
Prints a table and saves it under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import gc
import os
import time

import numpy as np
import torch

import memprof
from _results import command, machine, save


def loop(n: int, device: str = "cpu") -> None:
    for _ in range(n):
        torch.empty(16, device=device)


def untracked(n, device):
    t0 = time.perf_counter_ns()
    loop(n, device)
    return time.perf_counter_ns() - t0, 0


def memprof_track(n, device):
    t0 = time.perf_counter_ns()
    tracker = memprof.track(analyses=[])
    tracker.__enter__()
    loop(n, device)
    t1 = time.perf_counter_ns()
    tracker.__exit__(None, None, None)
    t2 = time.perf_counter_ns()
    events = tracker.profile.memory.size
    assert events >= 2 * n, events
    return t1 - t0, t2 - t1


def torch_profiler(n, device):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    t0 = time.perf_counter_ns()
    p = profile(activities=acts, profile_memory=True)
    p.__enter__()
    loop(n, device)
    t1 = time.perf_counter_ns()
    p.__exit__(None, None, None)
    p.events()  # torch.profiler builds its results lazily: count that as leaving
    t2 = time.perf_counter_ns()
    return t1 - t0, t2 - t1


def cuda_history(n, device):
    t0 = time.perf_counter_ns()
    torch.cuda.memory._record_memory_history(max_entries=4 * n)
    loop(n, device)
    torch.cuda.synchronize()
    t1 = time.perf_counter_ns()
    torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    t2 = time.perf_counter_ns()
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=300_000, help="loop iterations (2 events each)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "per_event"))
    args = ap.parse_args()
    n, dev = args.events, args.device
    modes = {"untracked": untracked, "memprof.track": memprof_track,
             "torch.profiler(profile_memory)": torch_profiler}
    if dev == "cuda":
        modes["cuda _record_memory_history"] = cuda_history
    loop(1000, dev)  # warm up the allocator and the dispatcher
    times = {m: [] for m in modes}
    for _ in range(args.rounds):
        for name, fn in modes.items():   # interleaved: every round runs every mode
            gc.collect()
            times[name].append(fn(n, dev))
    base = np.array([t[0] for t in times["untracked"]], dtype=np.float64)
    events = 2 * n
    lines = [f"per-event cost, {events:,} events ({n:,} x torch.empty(16) on {dev}), "
             f"{args.rounds} interleaved rounds; ns per event, median [p10-p90] over rounds",
             f"{'mode':34s} {'inside (vs untracked)':>28s} {'to leave':>22s} {'total':>10s}"]
    for name, ts in times.items():
        inside = (np.array([t[0] for t in ts]) - base) / events
        leave = np.array([t[1] for t in ts], dtype=np.float64) / events
        if name == "untracked":
            raw = base / events
            lines.append(f"{name:34s} {np.median(raw):10.0f} ns/event (loop itself)")
            continue
        p = lambda a: f"{np.median(a):6.0f} [{np.percentile(a, 10):4.0f}-{np.percentile(a, 90):4.0f}]"
        lines.append(f"{name:34s} {p(inside):>28s} {p(leave):>22s} "
                     f"{np.median(inside + leave):10.0f}")
    lines += [f"machine: {machine(device=dev)}", f"command: {command()}"]
    text = "\n".join(lines)
    print(text)
    save(args.out, text, {"machine": machine(device=dev), "command": command(),
                          "args": vars(args),
                          "ns": {m: [list(map(int, t)) for t in ts] for m, ts in times.items()}})


if __name__ == "__main__":
    main()
