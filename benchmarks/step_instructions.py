"""Instructions per training step in each tracking mode, counted by valgrind's callgrind.

The step-time benchmarks (overhead.py, overhead_health.py) measure what a user pays, in time,
and on this shared 2-core VM their rounds swing 2-3x: a change worth 5 % of memprof's own cost
is lost in their spread. An instruction count does not move with the machine's load, so this
one tells what a change to the per-step path costs, to the instruction, and where: the hook
points PyTorch runs for any tracker built on them (a global RecordFunction callback and the
allocators' reports, `hook points only`), memprof's native recording (`_C.start` alone: op
stack, names, event records) and its Python hooks (the rest of `track()`: module scope, pass,
backward and optimizer hooks, step ends, snapshots). torch.profiler(profile_memory=True) runs
in the same table.

What it is not: time. An instruction of Python's eval loop run between a step's kernels (cold
caches, mispredicted branches) costs several times one of the dispatcher's; the time figures
stay the step-time benchmarks'. Each mode runs in its own process under callgrind (about 50x
slower than native): the op-level twin of the benchmark MLP by default (the op sequence of
`mlp:64` on small tensors, so the kernels' own instructions do not bury the hooks').

Per step = (instructions of a window of `--window-b` steps - those of `--window-a` steps) /
(the difference in steps): what both windows share (the toggling itself, a window's entry and
exit) cancels. The windows sit between the leak probe's looks (after the 32nd step's end, before
the 64th's: it looks at the ends of steps 2, 4, 8, ..., and the step-time tables leave those
steps out too).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODES = ("untracked", "hook points only", "native recording only", "track(health=False)",
         "torch.profiler(profile_memory=True)")
#: steps run inside the block before the first window: past the leak probe's look at the
#: 32nd step's end; the windows end by the 63rd (its next look ends the 64th)
WARM_STEPS = 33


def _mode_context(mode: str, model, opt):
    import torch

    import memprof
    from _results import hook_points_only, native_recording_only
    if mode == "untracked":
        return contextlib.nullcontext()
    if mode == "hook points only":
        return hook_points_only()
    if mode == "native recording only":
        return native_recording_only()
    if mode == "track(health=False)":
        return memprof.track(model, opt, health=False)
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                  profile_memory=True)


def child(mode: str, spec: str, window_a: int, window_b: int) -> None:
    """Runs under callgrind with instrumentation off: turns it on past the warm-up, then dumps
    the counts of each window (callgrind_control, by this process's id)."""
    import torch
    torch.set_num_threads(1)
    from overhead_health import parse_workload, run_steps, workload
    name, batch, kwargs = parse_workload(spec)
    steps = WARM_STEPS + window_a + window_b
    model, opt, sched, batches, loss_fn = workload(name, batch, steps, kwargs)
    run_steps(model, opt, sched, batches[:WARM_STEPS], loss_fn)   # untracked warm-up

    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True,
                       capture_output=True)

    gc.disable()   # a collection inside one window only would count in it
    with _mode_context(mode, model, opt):
        run_steps(model, opt, sched, batches[:WARM_STEPS], loss_fn)
        control("--instr=on")
        start = WARM_STEPS
        for n in (window_a, window_b):
            control("--zero")
            run_steps(model, opt, sched, batches[start:start + n], loss_fn)
            control(f"--dump=window{n}")
            start += n
        control("--instr=off")
    gc.enable()


def count(mode: str, spec: str, window_a: int, window_b: int, workdir: str) -> float:
    """Instructions per step of one mode, from a callgrind run of this file as its child."""
    out = os.path.join(workdir, re.sub(r"\W+", "_", mode))
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
           f"--callgrind-out-file={out}.%p", sys.executable, os.path.abspath(__file__),
           "--child", mode, "--twin", spec, "--window-a", str(window_a),
           "--window-b", str(window_b)]
    # one hash seed for every mode and run: string hashes decide where dict and set entries
    # land, and with a random seed runs of one commit differed by up to ~8 K instructions a
    # step (~3 K with it fixed)
    run = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "0"})
    dumps = sorted(glob.glob(out + ".*.[0-9]*"), key=lambda p: int(p.rsplit(".", 1)[1]))
    if run.returncode != 0 or len(dumps) < 2:
        tail = (run.stderr or run.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"{mode}: callgrind run failed (status {run.returncode}): "
                         + " | ".join(tail))
    totals = []
    for path in dumps[:2]:
        with open(path) as f:
            match = re.search(r"^(?:summary|totals):\s*(\d+)", f.read(), re.M)
        totals.append(int(match.group(1)))
    return (totals[1] - totals[0]) / (window_b - window_a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--twin", default="mlp:4:in_features=16;hidden=32", metavar="SPEC",
                    help="workload NAME:BATCH[:k=v;...] (default: the op-level twin of the "
                         "benchmark MLP)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated, of: {', '.join(MODES)}")
    ap.add_argument("--window-a", type=int, default=10, help="steps in the first window")
    ap.add_argument("--window-b", type=int, default=20, help="steps in the second window")
    ap.add_argument("--out", default=None, help="write OUT.txt and OUT.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.twin, args.window_a, args.window_b)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; expected some of {list(MODES)}")
    if "untracked" not in modes:
        modes.insert(0, "untracked")
    if not 0 < args.window_a < args.window_b or WARM_STEPS + args.window_a + args.window_b > 63:
        raise SystemExit("--window-a/--window-b: expected 0 < A < B with A + B <= "
                         f"{63 - WARM_STEPS} (the windows end before the leak probe's look at "
                         "step 64)")
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: this benchmark counts instructions with "
                             "valgrind's callgrind (apt install valgrind)")
    from _results import command, machine, save
    with tempfile.TemporaryDirectory() as workdir:
        per_step = {}
        for mode in modes:
            per_step[mode] = count(mode, args.twin, args.window_a, args.window_b, workdir)
            print(f"  {mode}: {per_step[mode]:,.0f} instructions per step", flush=True)
    base = per_step["untracked"]
    lines = [f"# instructions per step (valgrind callgrind), workload {args.twin}, windows of "
             f"{args.window_a} and {args.window_b} steps",
             f"# machine: {machine(torch_threads=1)}", f"# command: {command()}", "",
             f"{'mode':38s} {'instructions/step':>17s} {'added':>11s} {'added %':>8s}"]
    for mode in modes:
        added = per_step[mode] - base
        lines.append(f"{mode:38s} {per_step[mode]:17,.0f} {added:11,.0f} "
                     f"{100 * added / base:7.1f}%")
    parts = {}
    if {"hook points only", "native recording only", "track(health=False)"} <= set(modes):
        parts = {"hook points": per_step["hook points only"] - base,
                 "native recording": per_step["native recording only"]
                 - per_step["hook points only"],
                 "Python hooks": per_step["track(health=False)"]
                 - per_step["native recording only"]}
        total = per_step["track(health=False)"] - base
        lines += ["", "track(health=False)'s added instructions: " + ", ".join(
            f"{k} {v:,.0f} ({100 * v / total:.0f} %)" for k, v in parts.items())]
    text = "\n".join(lines)
    print(text)
    if args.out:
        save(args.out, text, {"machine": machine(torch_threads=1), "command": command(),
                              "workload": args.twin, "windows": [args.window_a, args.window_b],
                              "instructions_per_step": per_step,
                              "track_parts": parts})


if __name__ == "__main__":
    main()
