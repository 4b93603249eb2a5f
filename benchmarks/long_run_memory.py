"""What memprof keeps in Python per training step, beside its native event log: the host
memory a long tracked run grows by (and that Python's garbage collector walks), while the log
records and once it is full (past `track(capacity=...)` the events are dropped; what else is
kept per step is then of no use to the analyses), with the time per step and the time to leave
the block.

A model of many small parameters makes the per-parameter records stand out: `--layers L`
Linear(8, 8) layers (2L parameters), AdamW, zero_grad(set_to_none=True) (new gradient
storages every step), batch 2, one thread. Each row runs in a fresh interpreter: `--steps`
steps with tracemalloc on (Python's own allocations: memprof's records, not the native log's
pages nor torch's tensors, which come from malloc), then as many steps timed without it, then
the block is left. "full" rows start the block with a capacity of 20 steps' events.

  python benchmarks/long_run_memory.py --layers 10,150 --steps 2000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _results import command, machine, save

HERE = os.path.dirname(os.path.abspath(__file__))


def child(layers: int, steps: int, full: bool) -> dict:
    import gc
    import tracemalloc
    import warnings
    import torch
    import memprof
    from memprof import _C
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(2, 8)

    def run(n: int) -> None:
        for _ in range(n):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    # events per step, measured untracked-equal in a short tracked block first
    with memprof.track(model, opt, health=False):
        run(3)
        per_step = _C.counters()["records"] / 3
    capacity = max(1, int(20 * per_step)) if full else 20_000_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the dropped-events warning of the "full" rows
        tracker = memprof.track(model, opt, health=False, capacity=capacity)
        with tracker:
            run(30)
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            run(steps)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            gc.collect()
            t = time.process_time()
            run(steps)
            step_us = (time.process_time() - t) / steps * 1e6
            t_leave = time.perf_counter()
        leave_s = time.perf_counter() - t_leave
    counters = tracker.profile.meta
    return {"params": 2 * layers, "full": full, "steps": steps,
            "events_per_step": round(per_step, 1), "python_bytes_per_step": grown / steps,
            "step_us": step_us, "leave_s": leave_s,
            "dropped": int(counters.get("dropped", 0))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="10,150", help="comma-separated layer counts")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "long_run_memory"))
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        layers, steps, full = args.child
        print(json.dumps(child(int(layers), int(steps), full == "1")))
        return
    rows = []
    for layers in (int(s) for s in args.layers.split(",")):
        for full in (False, True):
            r = subprocess.run([sys.executable, __file__, "--child", str(layers),
                                str(args.steps), "1" if full else "0"],
                               capture_output=True, text=True, cwd=HERE)
            if r.returncode != 0:
                raise SystemExit(r.stderr)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    lines = [f"memprof's Python memory per step, beside its native log ({args.steps} steps "
             f"per row, fresh process each; AdamW, zero_grad(set_to_none=True), 1 thread)",
             f"# machine: {machine()}", f"# command: {command()}", "",
             f"{'params':>6s} {'event log':>16s} {'events/step':>11s} "
             f"{'Python B/step':>13s} {'us/step':>8s} {'leaving s':>9s}"]
    for r in rows:
        state = f"full ({r['dropped']:,} dropped)" if r["full"] else "recording"
        lines.append(f"{r['params']:6d} {state:>16s} {r['events_per_step']:11.0f} "
                     f"{r['python_bytes_per_step']:13.0f} {r['step_us']:8.0f} "
                     f"{r['leave_s']:9.2f}")
    lines.append("# Python B/step: tracemalloc's traced memory grown over the steps, per step "
                 "(memprof's records kept in Python; the native log's 72 bytes per event come "
                 "on top while it records)")
    text = "\n".join(lines)
    print(text)
    save(args.out, text, {"machine": machine(), "command": command(), "rows": rows})


if __name__ == "__main__":
    main()
