"""What one autosave costs (memprof.track_autosave): its time inside the step it runs in, and
the memory it takes while it runs, against the events recorded so far; beside it, leaving the
block (its analyses and the final save of the same events).

Each size runs in a fresh interpreter (the memory figure is the process's max RSS, which only
grows): an MLP (8 blocks of Linear 64 + ReLU, AdamW, batch 16) trains under
`memprof.track(path=..., autosave=3600)` until the native log holds the given number of events;
then `save_now()` runs twice (the first pays one-off imports and caches; the second is what a
save costs in a long run), then the block is left. Rounds are separate processes; medians.

  python benchmarks/autosave_cost.py --events 300000,1500000 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from _results import command, machine, save

HERE = os.path.dirname(os.path.abspath(__file__))
EVENT_BYTES = 72


def child(events: int) -> dict:
    import torch
    import memprof
    from memprof import _C
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
                                  for _ in range(8)], torch.nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def rss_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "run.memprof")
        tracker = memprof.track(model, opt, path=path, autosave=3600.0)
        with tracker:
            steps = 0
            while _C.counters()["records"] < events:
                loss = torch.nn.functional.cross_entropy(model(torch.randn(16, 64)),
                                                         torch.randint(0, 10, (16,)))
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
            recorded = int(_C.counters()["records"])
            rss_before = rss_mib()
            saves = []
            for _ in range(2):
                t = time.perf_counter()
                tracker._autosave.save_now()
                saves.append(time.perf_counter() - t)
            rss_after = rss_mib()
            size = os.path.getsize(path)
            t_exit = time.perf_counter()
        exit_s = time.perf_counter() - t_exit
    return {"events": recorded, "steps": steps, "first_save_s": saves[0],
            "save_s": saves[1], "rss_before_mib": rss_before, "rss_after_mib": rss_after,
            "file_mib": size / 2**20, "exit_s": exit_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", default="300000,1500000",
                    help="event counts, comma-separated (default 300000,1500000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "autosave_cost"))
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return
    sizes = [int(x) for x in args.events.split(",")]
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    for _ in range(args.rounds):
        for n in sizes:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(n)],
                                 capture_output=True, text=True, check=True, cwd=HERE)
            runs[n].append(json.loads(out.stdout.strip().splitlines()[-1]))
    lines = [f"autosave cost, {args.rounds} fresh processes per size; medians [min-max]",
             f"machine: {machine()}", f"command: {command()}", "",
             f"{'events':>10} {'event MiB':>9} {'save s':>16} {'ns/event':>8} "
             f"{'first save s':>12} {'RSS +MiB':>9} {'x events':>8} {'file MiB':>8} "
             f"{'leaving s':>9}"]
    rows = []
    for n in sizes:
        rs = runs[n]

        def med(key):
            return statistics.median(r[key] for r in rs)
        ev = med("events")
        grow = [r["rss_after_mib"] - r["rss_before_mib"] for r in rs]
        save_s = [r["save_s"] for r in rs]
        row = {"events": ev, "event_mib": ev * EVENT_BYTES / 2**20, "save_s": med("save_s"),
               "save_s_min": min(save_s), "save_s_max": max(save_s),
               "ns_per_event": med("save_s") / ev * 1e9, "first_save_s": med("first_save_s"),
               "rss_growth_mib": statistics.median(grow),
               "growth_per_event_bytes": statistics.median(grow) / (ev * EVENT_BYTES / 2**20),
               "file_mib": med("file_mib"), "leaving_s": med("exit_s"), "runs": rs}
        rows.append(row)
        lines.append(f"{ev:>10,.0f} {row['event_mib']:>9.0f} "
                     f"{row['save_s']:>6.2f} [{min(save_s):.2f}-{max(save_s):.2f}] "
                     f"{row['ns_per_event']:>8.0f} {row['first_save_s']:>12.2f} "
                     f"{row['rss_growth_mib']:>9.0f} {row['growth_per_event_bytes']:>8.1f} "
                     f"{row['file_mib']:>8.1f} {row['leaving_s']:>9.2f}")
    lines += ["", "save s: the second save_now() of the block (the first pays one-off imports); "
              "RSS +MiB: max RSS after the two saves less before them; x events: that over the "
              "events' bytes; leaving s: the block's exit (analyses and the final save)"]
    text = "\n".join(lines)
    print(text)
    save(args.out, text, {"machine": machine(), "command": command(), "rows": rows})


if __name__ == "__main__":
    main()
