"""Cost per allocator event: inside a tracked block, and to leave it (build the Profile).

    python benchmarks/per_event.py [--events 300000] [--rounds 5]

The workload is a loop of `torch.empty(16)` (one allocation and one free per iteration, nothing
else), so the difference to the untracked loop is the recording cost per event. Measured in one
run, rounds interleaved (this machine's timings swing 2-3x): untracked, memprof.track (inside the
block, and the exit: draining the native log, building the Run and Profile, the analyses), and
torch.profiler(profile_memory=True) (inside, and its exit: building its event list, which is when
it pays for what it recorded); on a GPU also torch.cuda.memory._record_memory_history. The
references and the tracked modes run in a fresh child process each round (see in_child), each
timing the same loop untracked just before its block: "inside" is against that loop, run by
the same process a moment earlier (this process's untracked rows are printed for reference).
The last column is the peak memory while leaving: the process's peak resident set during the
exit (VmHWM, reset just before it) minus its resident set before the block started, over the raw
event bytes (events x the 72-byte record); the native log itself is part of it, so 1.0x is the
floor for a tracker that keeps every event. "memprof.track + analyses" leaves with the default
analyses and the summary, what a plain `with memprof.track(): ...` then `prof.summary()` pays.

"Inside" from two long loops swings by hundreds of ns per event between rounds on a shared
virtual machine, so it is also measured in short paired blocks (`--pairs`, `--chunk`): an
untracked chunk, a tracked one (only its loop timed), another untracked one, the cycle
collector off; the cost of a pair is the tracked chunk minus the mean of its two neighbours,
whose conditions it shares. torch.profiler's pairs run in a child process (see in_child).
The same pairs are run with memprof's hook points installed and its callbacks empty
(`memprof._C.start(hooks_only=True)`: PyTorch runs every op through RecordFunction and its CPU
allocator keeps every block's size in a locked map once a profiler slot asks for memory
reports): what the hooks cost before memprof does anything, a floor for any tracker on them.
Prints a table and saves it under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

import memprof
from _results import command, hook_points_only, machine, save


EVENT_BYTES = 72   # memprof.record.events.EVENT_DTYPE.itemsize, checked in main()


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


class LeavingPeak:
    """Peak resident bytes while leaving a block, above the resident bytes before it started
    (Linux: VmHWM reset through /proc/self/clear_refs)."""

    def __init__(self):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)   # freed heap of earlier rounds back first
        except OSError:
            pass
        self.before = _status_bytes("VmRSS")

    def leaving(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        return _status_bytes("VmHWM") - self.before


def loop(n: int, device: str = "cpu") -> None:
    for _ in range(n):
        torch.empty(16, device=device)




def _timed_loop(n, device) -> int:
    t0 = time.perf_counter_ns()
    loop(n, device)
    return time.perf_counter_ns() - t0


def untracked(n, device):
    return _timed_loop(n, device), 0, 0


def memprof_track(n, device, analyses=()):
    mem = LeavingPeak()
    t0 = time.perf_counter_ns()
    tracker = memprof.track(analyses=None if analyses is None else list(analyses))
    tracker.__enter__()
    loop(n, device)
    t1 = time.perf_counter_ns()
    mem.leaving()
    tracker.__exit__(None, None, None)
    if analyses is None:
        tracker.profile.summary()
    t2 = time.perf_counter_ns()
    events = tracker.profile.memory.size
    assert events >= 2 * n, events
    return t1 - t0, t2 - t1, mem.peak()


def memprof_track_analysed(n, device):
    return memprof_track(n, device, analyses=None)


def torch_profiler(n, device):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    mem = LeavingPeak()
    t0 = time.perf_counter_ns()
    p = profile(activities=acts, profile_memory=True)
    p.__enter__()
    loop(n, device)
    t1 = time.perf_counter_ns()
    mem.leaving()
    p.__exit__(None, None, None)
    p.events()  # torch.profiler builds its results lazily: count that as leaving
    t2 = time.perf_counter_ns()
    return t1 - t0, t2 - t1, mem.peak()


def in_child(fn):
    """Runs `fn` in a fresh process, warmed by a 100-iteration run, so that no round pays
    for another's leftovers. Seen here with every mode in one process: after a round with the
    analyses, glibc's heap held tens of MB freed; the trim before the next round handed those
    pages back, and the next loop touched them again through torch's aligned allocations, the
    untracked loop as much as a tracked one (+36 MB over 200,000 iterations, scratch), which
    read as 2.3x the raw bytes instead of 1.1-1.3x when charged to memprof. The child also
    times the loop untracked just before the block and returns it last: a child's loop is
    compared with its own process's, not with this one's (another process runs the same loop
    at a different speed: the long-loop rows read -115 ns at p10 that way)."""
    def run(n, device):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", fn.__name__,
                              "--events", str(n), "--device", device],
                             capture_output=True, text=True, check=True)
        return tuple(json.loads(out.stdout.strip().splitlines()[-1]))
    run.__name__ = fn.__name__
    return run




def _memprof_block(n, device) -> int:
    tracker = memprof.track(analyses=[])
    tracker.__enter__()
    try:
        took = _timed_loop(n, device)
    finally:
        tracker.__exit__(None, None, None)
    assert tracker.profile.memory.size >= 2 * n, tracker.profile.memory.size
    return took


def _profiler_block(n, device) -> int:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts, profile_memory=True):
        return _timed_loop(n, device)


def _hooks_only_block(n, device) -> int:
    """The loop under PyTorch's hook points alone (`_results.hook_points_only`)."""
    with hook_points_only(4 * n + 1024):
        return _timed_loop(n, device)


HOOKS_ONLY = "PyTorch's hooks, empty callbacks"
PAIRED = {"memprof.track": _memprof_block, "torch.profiler(profile_memory)": _profiler_block}


def paired_interleaved(blocks: dict, chunk: int, pairs: int, device) -> dict[str, list[float]]:
    """ns per event of each block over `pairs` paired short blocks (see the module
    docstring), one pair of each block in turn: they share the same minutes."""
    for block in blocks.values():
        block(100, device)   # one-off start-up costs are not per-event costs
    out = {name: [] for name in blocks}
    for _ in range(pairs):
        for name, block in blocks.items():
            gc.collect()
            gc.disable()
            try:
                before = _timed_loop(chunk, device)
                inside = block(chunk, device)
                after = _timed_loop(chunk, device)
            finally:
                gc.enable()
            out[name].append((inside - (before + after) / 2) / (2 * chunk))
    return out


def cuda_history(n, device):
    mem = LeavingPeak()
    t0 = time.perf_counter_ns()
    torch.cuda.memory._record_memory_history(max_entries=4 * n)
    loop(n, device)
    torch.cuda.synchronize()
    t1 = time.perf_counter_ns()
    mem.leaving()
    torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    t2 = time.perf_counter_ns()
    return t1 - t0, t2 - t1, mem.peak()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=300_000, help="loop iterations (2 events each)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reference-events", type=int, default=50_000,
                    help="loop iterations for torch.profiler and the CUDA history (their "
                         "leaving costs ~100 us per event here; compared per event)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "per_event"))
    ap.add_argument("--pairs", type=int, default=40,
                    help="paired short blocks for the 'inside' cost (0: none)")
    ap.add_argument("--chunk", type=int, default=10_000, help="loop iterations per paired block")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-paired", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_paired:   # torch.profiler's pairs, in a process of their own
        loop(1000, args.device)
        name = args.child_paired
        print(json.dumps(paired_interleaved({name: PAIRED[name]}, args.chunk, args.pairs,
                                            args.device)[name]))
        return
    if args.child:   # one measurement for in_child()
        loop(1000, args.device)
        fn = globals()[args.child]
        fn(100, args.device)   # warm: the profiler's one-off start-up is not per-event cost
        gc.collect()
        # the same loop untracked, in this process, just before: what "inside" is against
        baseline = _timed_loop(args.events, args.device)
        print(json.dumps(list(fn(args.events, args.device)) + [baseline]))
        return
    from memprof.record.events import EVENT_DTYPE
    assert EVENT_DTYPE.itemsize == EVENT_BYTES, EVENT_DTYPE.itemsize
    n, dev = args.events, args.device
    ref_n = min(n, args.reference_events)
    # mode -> (function, loop iterations); each is compared with the untracked loop of its size
    modes = {"untracked": (untracked, n), "memprof.track": (in_child(memprof_track), n),
             "memprof.track + analyses": (in_child(memprof_track_analysed), n),
             "torch.profiler(profile_memory)": (in_child(torch_profiler), ref_n)}
    if dev == "cuda":
        modes["cuda _record_memory_history"] = (in_child(cuda_history), ref_n)
    if ref_n != n:
        modes["untracked (reference size)"] = (untracked, ref_n)
    loop(1000, dev)  # warm up the allocator and the dispatcher
    times = {m: [] for m in modes}
    for _ in range(args.rounds):
        for name, (fn, iters) in modes.items():   # interleaved: every round runs every mode
            gc.collect()
            times[name].append(fn(iters, dev))
    untracked_ns = {iters: np.array([t[0] for t in times[name]], dtype=np.float64)
                    for name, (fn, iters) in modes.items() if fn is untracked}
    lines = [f"per-event cost, {2 * n:,} events ({n:,} x torch.empty(16) on {dev}; "
             f"torch.profiler and the CUDA history {2 * ref_n:,}), {args.rounds} interleaved "
             "rounds; ns per event, median [p10-p90] over rounds",
             f"{'mode':34s} {'inside (vs untracked)':>28s} {'to leave':>22s} {'total':>10s} "
             f"{'peak leaving, x raw':>20s}"]
    p = lambda a: f"{np.median(a):6.0f} [{np.percentile(a, 10):4.0f}-{np.percentile(a, 90):4.0f}]"
    for name, ts in times.items():
        fn, iters = modes[name]
        events = 2 * iters
        if fn is untracked:
            lines.append(f"{name:34s} {np.median(untracked_ns[iters]) / events:10.0f} ns/event "
                         "(loop itself)")
            continue
        # a child's loop against the untracked loop it ran just before, in its own process
        baseline = np.array([t[3] for t in ts], dtype=np.float64)
        inside = (np.array([t[0] for t in ts]) - baseline) / events
        leave = np.array([t[1] for t in ts], dtype=np.float64) / events
        peak = np.array([t[2] for t in ts], dtype=np.float64) / (events * EVENT_BYTES)
        lines.append(f"{name:34s} {p(inside):>28s} {p(leave):>22s} "
                     f"{np.median(inside + leave):10.0f} "
                     f"{np.median(peak):8.2f} [{peak.min():.2f}-{peak.max():.2f}]")
    pair_ns = {}
    if args.pairs > 0:
        pair_ns.update(paired_interleaved({"memprof.track": _memprof_block,
                                           HOOKS_ONLY: _hooks_only_block},
                                          args.chunk, args.pairs, dev))
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-paired",
                              "torch.profiler(profile_memory)", "--pairs", str(args.pairs),
                              "--chunk", str(args.chunk), "--device", dev],
                             capture_output=True, text=True, check=True)
        pair_ns["torch.profiler(profile_memory)"] = json.loads(out.stdout.strip().splitlines()[-1])
        lines.append(f"inside, paired short blocks ({args.pairs} pairs of {args.chunk:,} "
                     "iterations: untracked, tracked, untracked; cycle collector off); "
                     "ns per event, median [p10-p90] over pairs")
        for name, v in pair_ns.items():
            lines.append(f"{name:34s} {p(np.array(v)):>28s}")
    lines += [f"machine: {machine(device=dev)}", f"command: {command()}"]
    text = "\n".join(lines)
    print(text)
    save(args.out, text, {"machine": machine(device=dev), "command": command(),
                          "args": vars(args),
                          "ns": {m: [list(map(int, t)) for t in ts] for m, ts in times.items()},
                          "paired_ns_per_event": pair_ns})


if __name__ == "__main__":
    main()
