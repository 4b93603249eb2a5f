"""Communication time per optimizer step, from the collectives record.distributed timed.

Each torch.distributed collective called while tracking (DDP's bucket all-reduce through its
comm hook, FSDP2's all-gathers and reduce-scatters, the user's own calls) is one interval
from launch to completion on the host clock; an async call completes when its Work's future
does, so the interval includes waiting in the backend's queue. Per step, communication is
the union of those intervals inside the step's window (between two `step` markers): time
during which at least one collective was in flight, whether or not compute ran alongside it
(DDP overlaps its all-reduce with backward by design). The step then splits into data wait,
communication, and compute (the rest of the wall time).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..profile import Profile
from ..stats import describe as _stats


def completed_calls(profile: Profile) -> list[list]:
    """[op, t_start_ns, t_end_ns, bytes, async] of the calls that completed while tracking."""
    rec = profile.run.records.get("communication") or {}
    return [c for c in rec.get("calls") or () if c[2] is not None and c[2] >= c[1]]


def _merged(calls: list[list]) -> np.ndarray:
    """The union of the calls' intervals as disjoint, sorted [start, end] rows."""
    if not calls:
        return np.zeros((0, 2), dtype=np.int64)
    iv = np.array([[c[1], c[2]] for c in calls], dtype=np.int64)
    iv = iv[np.argsort(iv[:, 0], kind="stable")]
    ends = np.maximum.accumulate(iv[:, 1])
    new = np.ones(len(iv), dtype=bool)
    new[1:] = iv[1:, 0] > ends[:-1]
    starts = iv[new, 0]
    group = np.cumsum(new) - 1
    stops = np.zeros(starts.size, dtype=np.int64)
    np.maximum.at(stops, group, iv[:, 1])
    return np.stack([starts, stops], axis=1)


def per_step_ms(profile: Profile, calls: list[list]) -> list[float]:
    """Milliseconds with a collective in flight inside each step's window (one value per
    `step` marker; the first window starts where the recording did)."""
    bounds = [m["t_ns"] for m in profile.markers("step")]
    if not bounds:
        return []
    starts = np.array([int(profile.meta.get("t0_ns", 0))] + bounds[:-1], dtype=np.int64)
    ends = np.array(bounds, dtype=np.int64)
    merged = _merged(calls)
    if merged.size == 0:
        return [0.0] * len(bounds)
    lo = np.maximum(merged[None, :, 0], starts[:, None])
    hi = np.minimum(merged[None, :, 1], ends[:, None])
    return [float(x) * 1e-6 for x in np.clip(hi - lo, 0, None).sum(axis=1)]


def by_op(calls: list[list]) -> dict[str, dict[str, Any]]:
    """Per collective: calls, bytes (the largest tensor of each call, summed) and time."""
    out: dict[str, dict[str, Any]] = {}
    for op, t0, t1, nbytes, _async in calls:
        row = out.setdefault(op, {"calls": 0, "bytes": 0, "ms": 0.0})
        row["calls"] += 1
        row["bytes"] += int(nbytes)
        row["ms"] += (t1 - t0) * 1e-6
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["ms"]))


def add_to(summary: dict, profile: Profile) -> None:
    """Add communication to a throughput summary (analyse.throughput.summarize): per-step
    `comm_ms` and `compute_ms`, their statistics after the same warm-up steps, and the
    calls per collective. Nothing is added to a run without collectives."""
    rec = profile.run.records.get("communication") or {}
    if not rec.get("calls"):
        return
    calls = completed_calls(profile)
    rows = summary["per_step"]
    comm = per_step_ms(profile, calls)
    n = len(rows["wall_ms"])
    comm = (comm + [None] * n)[:n]       # one value per step row
    compute = []
    for wall, data, c in zip(rows["wall_ms"], rows["data_ms"], comm):
        compute.append(None if wall is None or c is None
                       else max(0.0, wall - (data or 0.0) - c))
    rows["comm_ms"] = [None if c is None else round(c, 4) for c in comm]
    rows["compute_ms"] = [None if c is None else round(c, 4) for c in compute]
    keep = slice(summary["warmup_steps_excluded"], n)
    st = summary["stats"]
    st["comm_ms"] = _stats([c for c in comm[keep] if c is not None])
    st["compute_ms"] = _stats([c for c in compute[keep] if c is not None])
    st["comm_fraction"] = _stats([c / w for c, w in zip(comm[keep], rows["wall_ms"][keep])
                                  if c is not None and w])
    summary["communication"] = {
        "by_op": by_op(calls), "calls": len(rec["calls"]),
        "incomplete_calls": len(rec["calls"]) - len(calls),
        "clock": "host (launch to completion)", "notes": list(rec.get("notes") or ())}
