"""Size and build time of the HTML report (and the Chrome trace) for a very long profile.

The profile is synthetic, built with numpy (seeded) rather than recorded: a training loop of
`steps` steps, each a forward that allocates activations (with a short-lived temporary
before each), a backward that frees them in reverse (again with temporaries) and an optimizer
with temporaries; parameters allocated once before the first step; per step all sizes scaled
by a random factor, and one planted 1 GiB temporary in one forward (the global peak). Markers
(forward_start ... step) as the tracker records them. 20M events take ~1.5 GB as events.

    python benchmarks/report_size.py [--events 20000000]

Times the Profile's own queries (pairing, categories, modules, steps) apart from the exports.
Checks that the page keeps the peak (the largest plotted stack equals Profile.peak, exactly,
in the embedded data the page's script draws) and prints the sizes; writes
benchmarks/results/report_size.{txt,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _results  # noqa: E402

from memprof.profile import Profile  # noqa: E402
from memprof.record.events import (DEVICE_CPU, EVENT_DTYPE, KIND_MARK, KIND_MEMORY,  # noqa: E402
                                   PHASE_BACKWARD, PHASE_FORWARD, PHASE_OPTIMIZER, PHASE_OTHER)
from memprof.run import Run  # noqa: E402

OPS = ["aten::mm", "aten::relu", "aten::add", "aten::empty", "aten::mul", "aten::softmax"]
MODULES = [""] + [f"layers.{i}" for i in range(8)] + ["head"]
MARKS = ["forward_start", "forward_end", "backward_start", "backward_end", "optimizer_start",
         "step"]
N_PARAMS = 50


def _step_template(acts: int, opt_pairs: int):
    """One step: (kind, local alloc id, sign, phase, op, marker label) per row."""
    rows = [("mark", -1, 0, PHASE_FORWARD, 0)]
    for a in range(acts):                                     # forward: temp, then activation
        rows += [("mem", acts + a, 1, PHASE_FORWARD, 4), ("mem", acts + a, -1, PHASE_FORWARD, 4),
                 ("mem", a, 1, PHASE_FORWARD, a % 3)]
    rows += [("mark", -1, 0, PHASE_FORWARD, 1), ("mark", -1, 0, PHASE_BACKWARD, 2)]
    for a in reversed(range(acts)):                           # backward: temp, free activation
        t = 2 * acts + a
        rows += [("mem", t, 1, PHASE_BACKWARD, 0), ("mem", t, -1, PHASE_BACKWARD, 0),
                 ("mem", a, -1, PHASE_BACKWARD, 0)]
    rows += [("mark", -1, 0, PHASE_BACKWARD, 3), ("mark", -1, 0, PHASE_OPTIMIZER, 4)]
    for k in range(opt_pairs):
        t = 3 * acts + k
        rows += [("mem", t, 1, PHASE_OPTIMIZER, 4), ("mem", t, -1, PHASE_OPTIMIZER, 4)]
    rows.append(("mark", -1, 0, PHASE_OPTIMIZER, 5))
    return rows, 3 * acts + opt_pairs


def synthetic_run(n_events: int = 20_000_000, seed: int = 0, acts: int = 1500) -> Run:
    rng = np.random.default_rng(seed)
    opt_pairs = max(1, acts // 3)
    template, n_local = _step_template(acts, opt_pairs)
    per_step = len(template)
    steps = max(1, (n_events - N_PARAMS) // per_step)
    is_mark = np.array([r[0] == "mark" for r in template])
    local = np.array([r[1] for r in template])
    sign = np.array([r[2] for r in template], dtype=np.int64)
    phase = np.array([r[3] for r in template], dtype=np.int8)
    code = np.array([r[4] for r in template])
    base = np.exp(rng.uniform(np.log(4096), np.log(4 << 20), n_local)).astype(np.int64)
    scale = rng.uniform(0.7, 1.3, steps)
    sizes = (base[None, :] * scale[:, None]).astype(np.int64)          # (steps, n_local)
    spike_step = int(rng.integers(steps // 4, steps))
    sizes[spike_step, acts] = 1 << 30                                   # a 1 GiB temporary
    n = N_PARAMS + steps * per_step
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    ev["t_ns"] = np.arange(n, dtype=np.int64) * 1000 + 1000
    for f in ("seq", "node", "module", "thread"):
        ev[f] = -1 if f != "thread" else 0
    ev["device_type"] = DEVICE_CPU
    p = ev[:N_PARAMS]
    p["ptr"] = np.arange(N_PARAMS) + 1
    p["size"] = 1 << 20
    p["kind"], p["phase"], p["op"] = KIND_MEMORY, PHASE_OTHER, OPS.index("aten::empty")
    body = ev[N_PARAMS:].reshape(steps, per_step)
    step_idx = np.arange(steps)[:, None]
    body["step"] = step_idx
    body["phase"] = phase[None, :]
    body["kind"] = np.where(is_mark, KIND_MARK, KIND_MEMORY)[None, :]
    body["ptr"] = np.where(is_mark[None, :], step_idx,
                           (step_idx + 1) * (1 << 20) + np.maximum(local, 0)[None, :])
    body["size"] = np.where(is_mark[None, :], 0,
                            sign[None, :] * np.take(sizes, np.maximum(local, 0), axis=1))
    body["op"] = np.where(is_mark, len(OPS) + code, code)[None, :]
    body["module"] = np.where(is_mark, -1, 1 + local % (len(MODULES) - 1))[None, :]
    return Run(events=ev, strings=OPS + MARKS, modules=MODULES,
               meta={"t0_ns": 0, "model_class": "Synthetic", "spike_step": spike_step})


def embedded_timeline(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="memprof-data">(.*?)</script>', page,
                  re.S)
    return json.loads(m.group(1).replace("<\\/", "</"))["timeline"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=20_000_000)
    args = ap.parse_args()
    from memprof.report.html import html_report
    from memprof.report.html_data import undelta
    from memprof.report.trace import chrome_trace
    t = time.perf_counter()
    prof = Profile(synthetic_run(args.events))
    built = time.perf_counter() - t
    t = time.perf_counter()
    prof.live_bytes(), prof.category, prof.event_module, prof.steps   # the Profile's own work
    queries = time.perf_counter() - t
    t = time.perf_counter()
    page = html_report(prof)
    html_s = time.perf_counter() - t
    t = time.perf_counter()
    trace = json.dumps(chrome_trace(prof), separators=(",", ":"))
    trace_s = time.perf_counter() - t
    tl = embedded_timeline(page)
    totals = np.sum([undelta(c) for c in tl["points"]["c"]], axis=0)
    rows = {"events": int(prof.memory.size), "steps": len(prof.steps), "peak_bytes": prof.peak,
            "plotted_max_bytes": int(totals.max()),
            "plotted_points": int(totals.size),
            "html_bytes": len(page.encode()), "html_s": round(html_s, 2),
            "trace_bytes": len(trace.encode()), "trace_s": round(trace_s, 2),
            "synthetic_run_s": round(built, 2), "profile_queries_s": round(queries, 2),
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    assert rows["plotted_max_bytes"] == prof.peak, rows
    text = "\n".join([f"report size for a synthetic profile ({_results.command()})"] +
                     [f"  {k:<18} {v:,}" if isinstance(v, int) else f"  {k:<18} {v}"
                      for k, v in rows.items()])
    print(text)
    _results.save("benchmarks/results/report_size", text,
                  {"rows": rows, "machine": _results.machine(), "command": _results.command()})


if __name__ == "__main__":
    main()
