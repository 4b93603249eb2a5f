"""What `import memprof` costs on top of `import torch` (issue 16: at most 0.3 s).

Each round starts fresh interpreters, in alternating order, for: `import torch`,
`import memprof`, and `import memprof` followed by what a first `memprof.track()` pulls in
(the recorders; the plan, report and Triton code stay unimported until used). Wall time per
interpreter, start-up included; the difference to `import torch` in the same round is what
memprof adds. Median and p10-p90 over rounds (this machine's timings swing 2-3x).

  python benchmarks/import_time.py --rounds 15
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _results import command, machine, pct, save

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = {
    "import torch": "import torch",
    "import memprof": "import memprof",
    "import memprof + first track()":
        "import torch, memprof\nwith memprof.track(analyses=[]):\n    torch.ones(4)",
}


def run_once(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def loaded_modules() -> dict:
    """Which heavy packages `import memprof` itself leaves imported."""
    probe = ("import sys, memprof; print(','.join(m for m in ('numpy', 'rich', 'triton', "
             "'memprof.plan', 'memprof.report', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.strip()
    return {"imported_by_import_memprof": out.split(",") if out else []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "import_time"))
    args = ap.parse_args()
    names = list(CASES)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            times[n].append(run_once(CASES[n]))
    base = times["import torch"]
    rows = []
    lines = [f"import cost, fresh interpreters, {args.rounds} interleaved rounds; seconds, "
             f"median [p10-p90]",
             f"{'case':34s} {'wall s':>22s} {'over import torch (paired)':>30s}"]
    for n in names:
        over = [t - b for t, b in zip(times[n], base)]
        row = {"case": n, "median_s": statistics.median(times[n]),
               "p10_s": pct(times[n], 0.1), "p90_s": pct(times[n], 0.9),
               "over_torch_median_s": statistics.median(over),
               "over_torch_p10_s": pct(over, 0.1), "over_torch_p90_s": pct(over, 0.9)}
        rows.append(row)
        extra = "" if n == "import torch" else \
            f"{row['over_torch_median_s']:+.3f} [{row['over_torch_p10_s']:+.3f}..." \
            f"{row['over_torch_p90_s']:+.3f}]"
        lines.append(f"{n:34s} {row['median_s']:6.3f} [{row['p10_s']:.3f}-{row['p90_s']:.3f}]"
                     f" {extra:>30s}")
    mods = loaded_modules()
    lines.append(f"left imported by `import memprof`: {mods['imported_by_import_memprof']}")
    info = machine()
    lines += [f"machine: {info}", f"command: {command()}"]
    text = "\n".join(lines)
    print(text)
    save(args.out, text, {"rows": rows, "raw_s": times, **mods, "machine": info,
                          "command": command()})


if __name__ == "__main__":
    main()
