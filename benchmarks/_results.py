"""What every benchmark records with its table (the machine, the command, the files), and the
one reference mode two of them time: PyTorch's hook points without memprof's work."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(**extra) -> dict:
    """Platform, CPU, cores, versions, load and commit; `extra` adds or overrides entries."""
    info = {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}
    try:
        import torch
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True,
                                            check=True).stdout.strip()
        # a run of code not yet committed says so (the commit alone would misname it)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        changed = subprocess.run(["git", "-C", root, "status", "--porcelain",
                                  "--untracked-files=no", "--", ".",
                                  ":(exclude)benchmarks/results"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        if changed:
            info["git_commit"] += "+uncommitted"
    except Exception:  # noqa: BLE001  (not a checkout)
        info["git_commit"] = "unknown"
    info.update(extra)
    return info


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def save(out: str, text: str, payload: dict) -> None:
    """Write `out`.txt (the printed table) and `out`.json (the rows and their context)."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".txt", "w") as f:
        f.write(text + "\n")
    with open(out + ".json", "w") as f:
        json.dump(payload, f, indent=1, default=str)


def pct(xs, q):
    """The nearest-rank `q` quantile of `xs` (the step-time tables' p10 and p90)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def step_row(xs, base: float, exits) -> dict:
    """One mode's columns of a step-time table from its step times `xs` and exit costs (s):
    median, p10/p90 (ms), overhead against the median `base` (s), steps, median exit (ms)."""
    med = statistics.median(xs)
    return {"median_step_ms": med * 1e3, "p10_ms": pct(xs, .1) * 1e3,
            "p90_ms": pct(xs, .9) * 1e3, "overhead_pct": (med / base - 1) * 100,
            "steps": len(xs), "exit_ms": statistics.median(exits) * 1e3}


def step_cells(r: dict) -> str:
    """A `step_row` printed: median, p10-p90, overhead, exit."""
    return (f"{r['median_step_ms']:10.1f} {r['p10_ms']:7.1f}-{r['p90_ms']:<8.1f} "
            f"{r['overhead_pct']:8.1f}% {r['exit_ms']:8.1f}")


@contextlib.contextmanager
def native_recording_only(capacity: int = 1 << 22):
    """memprof's native recording (`memprof._C.start`: the hook points, op stack, names and
    event records) without its Python hooks (module scope, passes, backward and optimizer
    hooks, step ends, snapshots): with hook_points_only and track() it splits memprof's cost
    into PyTorch's hook points, the native recording and the Python hooks."""
    from memprof import _C
    _C.start(capacity, False)
    try:
        yield
    finally:
        _C.stop()


@contextlib.contextmanager
def hook_points_only(capacity: int = 4096):
    """PyTorch's hook points as memprof installs them (a global RecordFunction callback, the
    CPU allocator's reports to the profiler slot) with memprof's callbacks returning at once
    (`memprof._C.start(hooks_only=True)`): what PyTorch's side of the hooks costs, the floor
    under any tracker built on them. Checks, on a clean exit, that nothing was recorded."""
    from memprof import _C
    _C.start(capacity, hooks_only=True)
    try:
        yield
    finally:
        warning = _C.stop()
    assert _C.counters()["records"] == 0 and not warning   # the callbacks did nothing
