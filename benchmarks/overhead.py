"""Step-time overhead of memprof.track vs an untracked run vs torch.profiler(profile_memory=True).

Each mode trains the same model on the same batches; modes are interleaved in rounds so that
machine noise hits all of them alike, and per-step wall times are pooled per mode. Reported:
median step time, p10-p90, overhead vs untracked, plus the one-off cost of leaving a track()
block (building the Profile and running the leak checks).

    python benchmarks/overhead.py                 # vit-tiny-ish model, batch 32
    python benchmarks/overhead.py --quick
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import memprof
from _results import command, machine, save, step_cells, step_row
from memprof.models import build_model

HERE = os.path.dirname(os.path.abspath(__file__))


def make_workload(args):
    torch.manual_seed(0)
    model, make_batch, loss_fn = build_model(args.model, **({"depth": args.depth}
                                                           if args.depth else {}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [make_batch(args.batch) for _ in range(args.steps)]
    return model, opt, batches, loss_fn


def run_steps(model, opt, batches, loss_fn) -> list[float]:
    times = []
    for inputs, targets in batches:
        t = time.perf_counter()
        loss = loss_fn(model(*inputs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def mode_untracked(w):
    return run_steps(*w), 0.0


def mode_memprof(w):
    model, opt, batches, loss_fn = w
    tracker = memprof.track(model, opt)
    tracker.__enter__()
    times = run_steps(model, opt, batches, loss_fn)
    t = time.perf_counter()
    tracker.__exit__(None, None, None)
    return times, time.perf_counter() - t


def mode_torch_profiler(w):
    from torch.profiler import ProfilerActivity, profile
    p = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    p.__enter__()
    times = run_steps(*w)
    t = time.perf_counter()
    p.__exit__(None, None, None)
    return times, time.perf_counter() - t


MODES = {"untracked": mode_untracked, "memprof.track": mode_memprof,
         "torch.profiler(profile_memory)": mode_torch_profiler}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit-tiny")
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="measured steps per round and mode")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1, help="steps dropped from each round")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "overhead"))
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.batch = 3, 2, 16
    workload = make_workload(args)
    pooled = {m: [] for m in MODES}
    exits = {m: [] for m in MODES}
    run_steps(*workload)  # warm up allocator caches and lazy optimizer state
    for r in range(args.rounds):
        order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
        for m in order:
            times, exit_cost = MODES[m](workload)
            pooled[m] += times[args.warmup:]
            exits[m].append(exit_cost)
    base = statistics.median(pooled["untracked"])
    rows = []
    for m in MODES:
        rows.append({"mode": m, **step_row(pooled[m], base, exits[m])})
    cmd = command()
    lines = [f"# memprof tracking overhead ({args.model}, batch {args.batch}, "
             f"{args.rounds} rounds x {args.steps} steps, first {args.warmup} of each round "
             "dropped)",
             f"# machine: {machine(device='cpu')}", f"# command: {cmd}", "",
             f"{'mode':34s} {'median ms':>10s} {'p10-p90 ms':>16s} {'overhead':>9s} "
             f"{'exit ms':>8s}"]
    for r in rows:
        lines.append(f"{r['mode']:34s} {step_cells(r)}")
    text = "\n".join(lines)
    print(text)
    save(args.out, text, {"machine": machine(device="cpu"), "command": cmd, "args": vars(args),
                          "rows": rows})
    return rows


if __name__ == "__main__":
    main()
