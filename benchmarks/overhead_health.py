"""Step-time overhead of track(), its health recorder, torch.profiler and PyTorch's hook points.

The loop is the same in every mode (forward, loss, backward, clip_grad_norm_, optimizer step,
LR scheduler step, zero_grad); modes are interleaved in rounds so that machine noise hits all
of them alike, and per-step wall times are pooled per mode. Reported per workload: median step
time, p10-p90, overhead vs untracked, and the one-off cost of leaving the block. The reference
is torch.profiler(profile_memory=True) around the same loop (leaving it = building its event
list).

    python benchmarks/overhead_health.py                    # vit-tiny b32 and mlp b64
    python benchmarks/overhead_health.py --quick
    python benchmarks/overhead_health.py --modes "track(health=False),hook points only"

Workloads run interleaved: each round runs every workload in every mode. `--twin SPEC` adds
the op-level twin of the first workload (the same loop and ops on small tensors): the twin's
added time per step, divided by the first workload's untracked step of the same round, is the
part of the first workload's overhead that does not grow with tensor sizes, from a
measurement with a fraction of the big step's noise. It is a lower bound, printed as derived
beside the direct figure: on the op-bound MLP the big step's added time was 1.1-2.6x the
twin's in the kept runs, for either tool. The allocator events per step of both are printed to show
they run the same ops.

Two modes are yardsticks. `untracked (control)` runs the untracked loop again between the
tracked modes (an A/A check): its paired figure is what the design reads where nothing is
tracked, so a tracked row means something only against it. `hook points only` runs the loop
with PyTorch's hook points installed as memprof installs them (a global RecordFunction
callback, the CPU allocator's reports to the profiler slot) and memprof's callbacks returning
at once, without its Python hooks: what PyTorch's side of the hooks costs this workload, under
any tracker built on them. (memprof's thin wrapper of the CPU allocator, installed at the
first block and kept for the process, is under every mode alike, untracked included.)

Every row also shows the minor page faults per step (the process's, getrusage; each round's
mean is saved in the JSON). glibc maps blocks above its mmap threshold (which moves with what
was freed) and unmaps them when freed, and gives the top of its heap back above its trim
threshold, so a step whose tensors are megabytes (the MLP's weight gradients are 3-4 MB, made
anew each step) touches fresh pages: 560-790 faults per step in the kept default-heap run,
1,400-3,400 in scratch counts - a cost that grows with tensor sizes and moves between modes
whether or not anything is tracked. `--heap steady` keeps freed memory mapped (glibc's
mallopt: trim and mmap thresholds at 1 GiB, as a caching allocator would), so the table
measures the tracker and not the heap's drift; the default heap is what a plain script gets.

Where the step's tensors land moves the kernels' speed by itself (alignment, cache sets): in
one process, holding an unused block of 4 KiB / 64 KiB / 3 MB before untracked blocks moved
their step by +0.9 / +2.2 / +2.2 %, and `hook points only` (callbacks that return at once)
read +4.5 % in that process against +1.0 % over six. A block's layout follows from what ran
before it, so a mode keeps much the same layout round after round, and its paired figure
carries that draw. `--heap-pad BYTES` holds an unused block of a random size (0-BYTES, a new
draw for every block, the same distribution for every mode) while each block runs: the layout
changes from round to round, and the medians compare modes over many layouts instead of one
each. It is meant for `--heap steady`, where big blocks come from the heap; with the default
heap glibc maps each big block apart, and a pad moves only the small ones.
"""
from __future__ import annotations

import argparse
import ast
import ctypes
import ctypes.util
import gc
import os
import random
import resource
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import memprof
from _results import hook_points_only, machine, native_recording_only, pct, save, step_row
from memprof.models import build_model

HERE = os.path.dirname(os.path.abspath(__file__))
#: an A/A control: untracked again, between the tracked modes, so that its paired figure shows
#: what the design itself reads where nothing is tracked (position in the round, the block
#: before it); the tracked rows mean something only beside it
CONTROL = "untracked (control)"
#: PyTorch's hook points as memprof installs them (a global RecordFunction callback, the CPU
#: allocator's reports to the profiler slot) with memprof's callbacks returning at once and no
#: Python hooks: the floor under any tracker of ops and allocations built on them
HOOK_POINTS = "hook points only"
#: memprof's native recording without its Python hooks (only when asked for with --modes):
#: beside the hook points and track(), where memprof's time goes
NATIVE = "native recording only"
MODES = ("untracked", "track(health=False)", CONTROL, HOOK_POINTS, NATIVE, "track(health=True)",
         "torch.profiler(profile_memory)")
DEFAULT_MODES = tuple(m for m in MODES if m != NATIVE)


def workload(name: str, batch: int, steps: int, model_kwargs: dict | None = None):
    torch.manual_seed(0)
    model, make_batch, loss_fn = build_model(name, **(model_kwargs or {}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    return model, opt, sched, [make_batch(batch) for _ in range(steps)], loss_fn


CLOCKS = {"wall": time.perf_counter,
          # this thread's CPU time: other processes on a shared machine barely move it
          # (with --threads 1 the whole step runs on this thread)
          "cpu": time.thread_time}
step_clock = time.perf_counter

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def set_heap_thresholds(nbytes: int) -> None:
    """glibc's trim and mmap thresholds, both fixed at `nbytes`: at 1 GiB (--heap steady)
    freed blocks stay mapped and big blocks come from the heap, so steps stop faulting fresh
    pages in (see the module docstring); at 128 KiB every big block is mapped and returned."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallopt") or not (libc.mallopt(_M_TRIM_THRESHOLD, nbytes)
                                            and libc.mallopt(_M_MMAP_THRESHOLD, nbytes)):
        raise SystemExit(f"mallopt refused a trim/mmap threshold of {nbytes} bytes (glibc "
                         "only); run with --heap default")


def minor_faults() -> int:
    """The process's minor page faults so far (all threads: intra-op threads fill pages too)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_steps(model, opt, sched, batches, loss_fn) -> tuple[list[float], list[int]]:
    """(each step's time, each step's minor page faults)."""
    times, faults = [], []
    for inputs, targets in batches:
        faults_before = minor_faults()
        t = step_clock()
        loss = loss_fn(model(*inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(step_clock() - t)
        faults.append(minor_faults() - faults_before)
    return times, faults


HOOKS = ("_opt_pre", "_on_forward", "_on_backward", "_on_clip", "_on_sched")


class HookClock:
    """Times the health recorder's own work (inside its hooks) while a block runs."""

    def __init__(self):
        self.total = 0.0
        self._saved = {}

    def __enter__(self):
        from memprof.record.health import HealthRecorder
        for name in HOOKS:
            orig = HealthRecorder.__dict__[name]
            self._saved[name] = orig

            def timed(*a, _orig=orig, **k):
                t = time.perf_counter()
                try:
                    return _orig(*a, **k)
                finally:
                    self.total += time.perf_counter() - t
            setattr(HealthRecorder, name, timed)
        return self

    def __exit__(self, *exc):
        from memprof.record.health import HealthRecorder
        for name, orig in self._saved.items():
            setattr(HealthRecorder, name, orig)
        return False


def run_mode(mode: str, w, hook_ms: list | None = None,
             events_per_step: list | None = None) -> tuple[list[float], list[int], float]:
    """(step times, step faults, seconds to leave the block) of one block in `mode`."""
    if mode in ("untracked", CONTROL):
        return *run_steps(*w), 0.0
    if mode == HOOK_POINTS:
        with hook_points_only():
            return *run_steps(*w), 0.0
    if mode == NATIVE:
        with native_recording_only():
            return *run_steps(*w), 0.0
    if mode == "torch.profiler(profile_memory)":
        from torch.profiler import profile
        prof = profile(profile_memory=True)
        prof.__enter__()
        try:
            times, faults = run_steps(*w)
        finally:
            t = time.perf_counter()
            prof.__exit__(None, None, None)
            prof.events()   # built lazily: count it as leaving
        return times, faults, time.perf_counter() - t
    health = mode == "track(health=True)"
    clock = HookClock() if health and hook_ms is not None else None
    if clock:
        clock.__enter__()
    tracker = memprof.track(w[0], w[1], health=health)
    tracker.__enter__()
    try:
        times, faults = run_steps(*w)
    finally:
        t = time.perf_counter()
        tracker.__exit__(None, None, None)
        exit_s = time.perf_counter() - t
        if clock:
            clock.__exit__(None, None, None)
            hook_ms.append(clock.total * 1e3 / len(w[3]))
    if events_per_step is not None:
        events_per_step.append(tracker.profile.run.streams.memory.size / len(w[3]))
    # run_steps is a function the block outlives: memprof's leak probe looks at a few step
    # ends (a heap scan, once per doubling of the steps), inside the optimizer step of step
    # n - 1 (memprof's own throughput figures leave out step n, whose window it opens); those
    # steps are left out here too: the looks' time is not a per-step cost
    looks = (tracker.profile.run.records.get("leak_probe") or {}).get("looks", ())
    probed = {n - 1 for n, _ in looks}
    kept = [i for i in range(len(times)) if i not in probed]
    if len(kept) <= len(times) // 2:   # a block of a few steps (tests): keep them all
        kept = list(range(len(times)))
    return [times[i] for i in kept], [faults[i] for i in kept], exit_s


def parse_workload(spec: str) -> tuple[str, int, dict]:
    """`model:batch` or `model:batch:key=value;key=value` (constructor keywords, literals):
    e.g. `mlp:4:in_features=16;hidden=32`, the benchmark MLP's loop and ops at a size where
    a step is ~1 ms, so the part of the time tracking adds that does not grow with tensor
    sizes stands out of the noise."""
    name, batch, *rest = spec.split(":")
    kwargs = {}
    for item in (rest[0].split(";") if rest and rest[0] else []):
        key, _, value = item.partition("=")
        kwargs[key.strip()] = ast.literal_eval(value.strip())
    return name, int(batch), kwargs


def workload_label(name: str, batch: int, kwargs: dict) -> str:
    return f"{name} b{batch}" + (f" ({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
                                 if kwargs else "")


def selected_modes(names: str | None) -> tuple[str, ...]:
    """The modes to run, in MODES order, untracked always first (every figure is paired with
    it); `names`: comma-separated, e.g. "track(health=False),hook points only"."""
    if not names:
        return DEFAULT_MODES
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown mode {unknown[0]!r}; expected some of: "
                         + ", ".join(MODES))
    return tuple(m for m in MODES if m == "untracked" or m in wanted)


def collect(specs: list[str], args, modes: tuple[str, ...] = DEFAULT_MODES) -> dict:
    """Every workload in every mode each round (the order reversed every other round), in
    this process -> the raw figures, per spec and mode: step times pooled, each round's
    median step, exit costs, each round's mean faults per step; and per spec the events per
    step and the health hooks' ms per step."""
    parsed = {spec: parse_workload(spec) for spec in specs}
    loads = {spec: workload(name, batch, args.steps, kw)
             for spec, (name, batch, kw) in parsed.items()}
    for w in loads.values():
        run_steps(*w)  # warm up allocator caches and lazy optimizer state
    raw = {key: {s: {m: [] for m in modes} for s in specs}
           for key in ("pooled", "per_round", "exits", "round_faults")}
    raw["events"] = {s: [] for s in specs}                   # allocator events per step
    raw["hook_ms"] = {s: [] for s in specs}
    raw["pads"] = {s: {m: [] for m in modes} for s in specs}
    # one draw per block, from the same distribution for every mode (see --heap-pad)
    pad_sizes = random.Random(args.round_offset)
    for r in range(args.round_offset, args.round_offset + args.rounds):
        for spec in (specs if r % 2 == 0 else specs[::-1]):
            for m in (modes if r % 2 == 0 else tuple(reversed(modes))):
                # no cyclic garbage left from the last block: a collection inside this one
                # would free its tensors there (frees in its events, time in its steps)
                gc.collect()
                pad_bytes = pad_sizes.randrange(0, args.heap_pad + 1, 64) if args.heap_pad else 0
                pad = torch.empty(pad_bytes, dtype=torch.uint8)   # held while the block runs
                times, step_faults, exit_cost = run_mode(
                    m, loads[spec],
                    events_per_step=raw["events"][spec] if m == "track(health=False)" else None)
                del pad
                raw["pads"][spec][m].append(pad_bytes)
                raw["pooled"][spec][m] += times[args.warmup:]
                raw["per_round"][spec][m].append(statistics.median(times[args.warmup:]))
                raw["exits"][spec][m].append(exit_cost)
                raw["round_faults"][spec][m].append(statistics.mean(step_faults[args.warmup:]))
    for spec in specs if "track(health=True)" in modes else ():
        for _ in range(args.rounds):   # separate rounds: timing the hooks costs time itself
            run_mode("track(health=True)", loads[spec], raw["hook_ms"][spec])
    return raw


def collect_in_processes(specs: list[str], args, argv: list[str]) -> tuple[dict, list[dict]]:
    """`collect` in args.processes fresh processes, one after the other, their rounds pooled
    (-> the merged figures, and each process's own). Why: where a process's allocations
    happen to land moves its big kernels' speed (alignment, cache sets), and tracking
    changes what a process allocates - so one process draws one layout for each mode, and
    its paired figure carries that draw; the processes' figures show how far it moves."""
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = os.path.join(tmp, f"part{i}.json")
            # rounds numbered on from the last process's: the order alternates as in one
            cmd = [sys.executable, os.path.abspath(__file__)] + argv + \
                ["--processes", "1", "--raw-out", out, "--round-offset", str(i * args.rounds)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(out) as f:
                parts.append(json.load(f))
    return merge_parts(parts), parts


def merge_parts(parts: list[dict]) -> dict:
    """`collect`'s figures of several processes as one: every list concatenated in process
    order, so that round i of one mode or workload stays beside round i of every other."""
    merged = {}
    for key, value in parts[0].items():
        merged[key] = {s: ({m: [x for p in parts for x in p[key][s][m]] for m in v}
                           if isinstance(v, dict) else [x for p in parts for x in p[key][s]])
                       for s, v in value.items()}
    return merged


def paired(per_round: dict, spec: str, mode: str) -> list[float]:
    """Per round: its median step in `mode` over the same round's untracked median, - 1 (%):
    what a shared machine's load does to one round (seconds apart) cancels out."""
    return [100 * (a / b - 1) for a, b in zip(per_round[spec][mode],
                                              per_round[spec]["untracked"])]


def summarise(specs: list[str], raw: dict, modes: tuple[str, ...] = DEFAULT_MODES) -> list[dict]:
    """A row per workload and mode from `collect`'s figures."""
    parsed = {spec: parse_workload(spec) for spec in specs}
    rows = []
    for spec in specs:
        pooled, per_round = raw["pooled"][spec], raw["per_round"]
        base = statistics.median(pooled["untracked"])
        for m in modes:
            pairs = paired(per_round, spec, m)
            rows.append({"workload": workload_label(*parsed[spec]), "mode": m,
                         "added_us_per_step": (statistics.median(pooled[m]) - base) * 1e6,
                         # rounds have equal steps: their mean is the mean over all steps
                         "faults_per_step": float(statistics.mean(raw["round_faults"][spec][m])),
                         "faults_per_step_each_round": raw["round_faults"][spec][m],
                         "events_per_step": (statistics.median(raw["events"][spec])
                                             if m == "track(health=False)" else None),
                         "health_hooks_ms_per_step": (statistics.median(raw["hook_ms"][spec])
                                                      if m == "track(health=True)" else None),
                         **step_row(pooled[m], base, raw["exits"][spec][m]),
                         "paired_overhead_pct": statistics.median(pairs),
                         "paired_p10_pct": pct(pairs, .1), "paired_p90_pct": pct(pairs, .9)})
    return rows


def derived_rows(big: str, twin: str, per_round: dict,
                 modes: tuple[str, ...] = DEFAULT_MODES) -> list[dict]:
    """Per round: (the twin's median step in a mode - its untracked one) / the big
    workload's untracked median step, all of the same round; median and p10..p90 over rounds."""
    rows = []
    for m in modes[1:]:
        pcts = [100 * (t - tu) / bu for t, tu, bu in zip(
            per_round[twin][m], per_round[twin]["untracked"], per_round[big]["untracked"])]
        added = [1e6 * (t - tu) for t, tu in zip(per_round[twin][m],
                                                 per_round[twin]["untracked"])]
        rows.append({"mode": m, "derived_pct": statistics.median(pcts),
                     "p10_pct": pct(pcts, .1), "p90_pct": pct(pcts, .9),
                     "twin_added_us": statistics.median(added),
                     "big_untracked_ms": 1e3 * statistics.median(per_round[big]["untracked"])})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="vit-tiny:32,mlp:64",
                    help="comma-separated model:batch[:key=value;...] (memprof.models names "
                         "and constructor keywords)")
    ap.add_argument("--steps", type=int, default=8, help="steps per round and mode")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="steps dropped from each round")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="step times from wall time or this thread's CPU time (use --threads 1)")
    ap.add_argument("--twin", metavar="SPEC",
                    help="op-level twin of the first workload (same loop and ops, small "
                         "tensors), run in the same rounds: its added time per step over the "
                         "first workload's step is printed as a derived lower bound")
    ap.add_argument("--heap", choices=("default", "steady"), default="default",
                    help="steady: glibc keeps freed memory mapped, so steps do not fault "
                         "fresh pages in (see the module docstring); default: as a plain "
                         "script runs")
    ap.add_argument("--heap-pad", type=int, default=0, metavar="BYTES",
                    help="before each block (every mode alike) hold an unused block of a "
                         "random size in [0, BYTES], a new draw per block: where the step's "
                         "tensors land then changes from round to round, so no mode keeps "
                         "one lucky or unlucky layout (see the module docstring)")
    ap.add_argument("--processes", type=int, default=1,
                    help="run the rounds in this many fresh processes, --rounds in each, and "
                         "pool them (see collect_in_processes); the paired figure of each "
                         "process is printed too")
    ap.add_argument("--raw-out", help=argparse.SUPPRESS)   # a child's raw figures (JSON)
    ap.add_argument("--round-offset", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--modes", help="comma-separated subset of the modes (untracked always "
                    "runs): " + ", ".join(MODES[1:]) + f" (all but {NATIVE!r} by default)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "overhead_health"))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 4, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    global step_clock
    step_clock = CLOCKS[args.clock]
    if args.heap == "steady":
        set_heap_thresholds(1 << 30)
    modes = selected_modes(args.modes)
    load_before = machine(device="cpu")["load_average_1_5_15min"]
    specs = args.workloads.split(",")
    if args.twin:
        parse_workload(args.twin)   # a bad spec fails before the run
    all_specs = specs + ([args.twin] if args.twin else [])
    if args.raw_out:   # a child of collect_in_processes
        with open(args.raw_out, "w") as f:
            json.dump(collect(all_specs, args, modes), f)
        return None
    if args.processes < 1:
        raise SystemExit(f"--processes: expected a positive number, got {args.processes}")
    if args.processes > 1:
        raw, parts = collect_in_processes(all_specs, args, argv)
    else:
        raw, parts = collect(all_specs, args, modes), []
    rows = summarise(all_specs, raw, modes)
    per_round = raw["per_round"]
    derived = derived_rows(specs[0], args.twin, per_round, modes) if args.twin else []
    cmd = shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    wl = max([14] + [len(r["workload"]) for r in rows])
    rounds = args.rounds * args.processes
    where = f" in {args.processes} processes" if args.processes > 1 else ""
    lines = [f"# memprof training-health overhead ({rounds} rounds{where} x {args.steps} steps "
             f"per mode, first {args.warmup} of each round dropped; loop: forward, loss, "
             f"backward, clip_grad_norm_, AdamW step, LambdaLR step, zero_grad; {args.clock} "
             f"time per step; heap: {args.heap}"
             + (f", a random pad of 0-{args.heap_pad} bytes held under each block"
                if args.heap_pad else "") + ")",
             f"# machine: {machine(device='cpu')} (load average before the run: {load_before})",
             f"# command: python {cmd}", "",
             f"{'workload':{wl}s} {'mode':30s} {'median ms':>10s} {'p10-p90 ms':>16s} "
             f"{'overhead':>9s} {'added us':>9s} {'paired':>7s} {'paired p10..p90':>16s} "
             f"{'exit ms':>8s} {'faults/step':>11s} {'events/step':>11s} "
             f"{'health hooks ms/step':>21s}"]
    for r in rows:
        lines.append(f"{r['workload']:{wl}s} {r['mode']:30s} {r['median_step_ms']:10.2f} "
                     f"{r['p10_ms']:7.2f}-{r['p90_ms']:<8.2f} {r['overhead_pct']:8.1f}% "
                     f"{r['added_us_per_step']:9.0f} "
                     f"{r['paired_overhead_pct']:6.1f}% "
                     f"{r['paired_p10_pct']:7.1f}..{r['paired_p90_pct']:<6.1f}% "
                     f"{r['exit_ms']:8.1f} {r['faults_per_step']:11.0f} "
                     + (f"{r['events_per_step']:11.0f} " if r["events_per_step"] is not None
                        else f"{'':11s} ")
                     + (f"{r['health_hooks_ms_per_step']:21.3f}"
                        if r["health_hooks_ms_per_step"] is not None else f"{'':21s}"))
    lines.append("# overhead: pooled median step against the untracked one (added us: their "
                 "difference per step); paired: median over "
                 "rounds of (the round's median step / the same round's untracked median) - 1, "
                 "with its p10..p90 over rounds")
    lines.append("# health hooks ms/step: time spent inside the health recorder's hooks "
                 "(grad norm, LR reads, loss .item(), clip/scheduler records) per step, "
                 "median over separate rounds")
    lines.append("# faults/step: minor page faults of the process per step, mean")
    lines.append("# events/step: allocator events (allocations and frees) per step that "
                 "track() recorded")
    if derived:
        big, twin = workload_label(*parse_workload(specs[0])), \
            workload_label(*parse_workload(args.twin))
        lines += ["", f"# derived lower bound of {big}'s overhead: the added time per step of "
                      f"its op-level twin {twin}, over {big}'s untracked step, per round "
                      f"(median [p10..p90] over {rounds} rounds; only the part that does "
                      "not grow with tensor sizes, not a measurement of the big step itself)",
                  f"{'mode':30s} {'twin added us':>13s} {'big step ms':>11s} "
                  f"{'derived':>8s} {'p10..p90':>16s}"]
        for d in derived:
            lines.append(f"{d['mode']:30s} {d['twin_added_us']:13.0f} "
                         f"{d['big_untracked_ms']:11.2f} {d['derived_pct']:7.2f}% "
                         f"{d['p10_pct']:7.2f}..{d['p90_pct']:<6.2f}%")
    each_process = {spec: {m: [statistics.median(paired(p["per_round"], spec, m)) for p in parts]
                           for m in modes[1:]} for spec in all_specs} if parts else {}
    if parts:
        lines += ["", f"# each process's paired overhead (median over its {args.rounds} rounds): "
                      "how far one process's figure moves with where its allocations landed",
                  f"{'workload':{wl}s} {'mode':30s} per process"]
        for spec in all_specs:
            for m in modes[1:]:
                lines.append(f"{workload_label(*parse_workload(spec)):{wl}s} {m:30s} "
                             + " ".join(f"{x:5.1f}%" for x in each_process[spec][m]))
    text = "\n".join(lines)
    print(text)
    save(args.out, text, {"machine": machine(device="cpu"), "command": f"python {cmd}",
                          "args": vars(args), "rows": rows, "derived": derived,
                          "paired_pct_each_process": each_process})
    return rows


if __name__ == "__main__":
    main()
