"""Budgets without the GPU, checked against longer and smaller real runs (CPU).

1. A leak (an MLP keeping a 1.5 MiB activation per step): the step at which a budget runs out,
   projected from 6 recorded steps (memprof.plan.budget: replay of synthesized steps) and by
   the linear rule of analyse.growth, against a recording long enough to reach the budget,
   replayed against the same budget.
2. A step too big (MLP 512-512-512-10, AdamW, batch 1024): the micro-batch the scaled replay
   says fits, run for real at micro-batch x accumulation and replayed against the budget.
3. The demo's leaking DCAL loop against v100-16gb: the projected step and the replay's cost.

    python benchmarks/budget.py            # writes benchmarks/results/budget_cpu.{txt,json}
"""
from __future__ import annotations

import io
import os
import sys
import time

import torch

import memprof
from _results import command, machine, save
from memprof.analyse.growth import memory_growth
from memprof.plan.budget import replay

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.plan.test_budget_replay import leaky_run  # noqa: E402  (the tests' workload)
from tests.plan.test_fit_advice import train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 1 << 20


def leak_rows() -> list[dict]:
    per = replay(leaky_run(12).profile, 1 << 40).per_step
    rows = []
    for k in (12, 40, 120):
        budget = per[5]["peak_reserved"] + k * int(1.5 * MIB)
        short = leaky_run(6, budget=budget)
        t = time.perf_counter()
        proj = replay(short.profile, budget).projection
        dt = time.perf_counter() - t
        linear = memory_growth(short.profile, capacity=budget)[0].evidence["projected_step"]
        long = leaky_run(proj["step"] + 4, budget=budget)
        rows.append({"budget_mib": budget / MIB, "projected": proj["step"], "linear": linear,
                     "actual": long.meta["budget"]["failure"]["where"]["step"],
                     "replays": proj["replays"], "seconds": dt})
    return rows


def fit_rows() -> list[dict]:
    rows = []
    for mib in (24, 28):
        prof, _, _ = train(1024, budget=mib * MIB)
        fail = prof.meta["budget"]["failure"]
        s = prof.meta["fit"]["scaled"]
        real, _, _ = train(s["micro_batch"], s["accumulation"], budget=mib * MIB)
        rows.append({"budget_mib": mib, "fails_at": f"step {fail['where']['step']} "
                     f"{fail['where']['phase']}", "cause": fail["cause"]["cause"],
                     "scaled": f"{s['micro_batch']} x {s['accumulation']}",
                     "scaled_reserved_mib": s["peak_reserved"] / MIB,
                     "real_reserved_mib": real.meta["budget"]["peak_reserved"] / MIB,
                     "real_fits": real.meta["budget"]["fits"]})
    return rows


def demo_row() -> dict:
    from rich.console import Console

    from memprof.demo import _train
    prof, wall = _train(Console(file=io.StringIO()), 6, detach_history=False, keep_maps=True,
                        report=False)
    t = time.perf_counter()
    r = replay(prof.profile, "v100-16gb")
    return {"events": int(prof.memory.size), "projected": r.projection["step"],
            "leak_mib_per_step": r.projection["leak_bytes_per_step"] / MIB,
            "reserved_growth_mib_per_step": r.projection["reserved_growth_per_step"] / MIB,
            "usable_gib": r.capacity / 2**30, "replay_seconds": time.perf_counter() - t,
            "train_seconds": wall}


def main() -> int:
    t0 = time.perf_counter()
    leak, fit, demo = leak_rows(), fit_rows(), demo_row()
    lines = [f"memprof budget benchmark  ({time.strftime('%Y-%m-%d %H:%M:%S')})",
             f"command: {command()}", f"machine: {machine()}", "",
             "1. leak of 1.5 MiB/step: step at which the budget runs out (all replays of the "
             "allocator model)",
             f"{'budget MiB':>10} {'projected':>9} {'linear':>7} {'actual':>7} {'replays':>7} "
             f"{'seconds':>8}"]
    lines += [f"{r['budget_mib']:>10.1f} {r['projected']:>9} {r['linear']:>7} {r['actual']:>7} "
              f"{r['replays']:>7} {r['seconds']:>8.3f}" for r in leak]
    lines += ["projected: 6 recorded steps + synthesized steps replayed; linear: analyse.growth's "
              "rule on allocated bytes; actual: a recording that long, replayed", "",
              "2. MLP 512-512-512-10, AdamW, batch 1024: what fits, run for real",
              f"{'budget MiB':>10} {'fails at':>16} {'cause':>13} {'scaled':>9} "
              f"{'predicted MiB':>13} {'real MiB':>9} {'fits':>5}"]
    lines += [f"{r['budget_mib']:>10} {r['fails_at']:>16} {r['cause']:>13} {r['scaled']:>9} "
              f"{r['scaled_reserved_mib']:>13.2f} {r['real_reserved_mib']:>9.2f} "
              f"{str(r['real_fits']):>5}" for r in fit]
    lines += ["", "3. demo: the leaking DCAL loop (6 steps, CPU) against v100-16gb",
              "  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in demo.items()),
              "", f"total {time.perf_counter() - t0:.1f} s"]
    text = "\n".join(lines)
    print(text)
    save(os.path.join(HERE, "results", "budget_cpu"), text,
         {"command": command(), "machine": machine(), "leak": leak, "fit": fit, "demo": demo})
    return 0


if __name__ == "__main__":
    sys.exit(main())
