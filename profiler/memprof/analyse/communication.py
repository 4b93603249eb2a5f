"""Communication time per optimizer step, from the collectives record.distributed timed.

Each torch.distributed collective called while tracking (DDP's bucket all-reduce through its
comm hook, FSDP2's all-gathers and reduce-scatters, the user's own calls) is one interval
from launch to completion on the host clock; an async call completes when its Work's future
does, so the interval includes waiting in the backend's queue. Per step, communication is
the union of those intervals inside the step's window (between two `step` markers): time
during which at least one collective was in flight, whether or not compute ran alongside it
(DDP overlaps its all-reduce with backward by design). The step then splits into data wait,
communication, and compute: the rest of the wall time, outside both. A collective in flight
during the data wait (HF Trainer all-gathers the batch's token count there; a rank waiting
for a slower one's batch) is time of both, subtracted once: compute is the wall time less
the union of the two.
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
    return [float(x) * 1e-6 for x in _covered_ns(_merged(calls), starts, ends)]


def _covered_ns(merged: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Nanoseconds of the sorted, disjoint [start, end] rows of `merged` inside each window
    [starts[i], ends[i]], by prefix sums: O((rows + windows) log rows), where a windows x rows
    matrix took seconds and gigabytes on a long DDP run."""
    starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    if merged.size == 0:
        return np.zeros(starts.shape, dtype=np.int64)
    s, e = merged[:, 0].astype(np.int64), merged[:, 1].astype(np.int64)
    before = np.concatenate(([0], np.cumsum(e - s)))

    def covered_until(t):
        k = np.searchsorted(s, t, "right")          # rows that start at or before t
        last = e[np.maximum(k - 1, 0)]
        return before[k] - np.where(k > 0, np.maximum(0, last - t), 0)
    return np.maximum(0, covered_until(ends) - covered_until(starts))


def overlap_ms(merged: np.ndarray, windows: list[tuple[int, int]]) -> float:
    """Milliseconds of the disjoint [start, end] rows `merged` inside the windows."""
    if merged.size == 0 or not windows:
        return 0.0
    w = np.array(windows, dtype=np.int64)
    return float(_covered_ns(merged, w[:, 0], w[:, 1]).sum()) * 1e-6


def by_op(calls: list[list]) -> dict[str, dict[str, Any]]:
    """Per collective: calls, bytes (each call's whole buffer, record.distributed's
    collective_bytes, summed) and time."""
    out: dict[str, dict[str, Any]] = {}
    for op, t0, t1, nbytes, _async in calls:
        row = out.setdefault(op, {"calls": 0, "bytes": 0, "ms": 0.0})
        row["calls"] += 1
        row["bytes"] += int(nbytes)
        row["ms"] += (t1 - t0) * 1e-6
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["ms"]))


def add_to(summary: dict, profile: Profile, data_spans) -> None:
    """Add communication to a throughput summary (analyse.throughput.summarize): per-step
    `comm_ms` and `compute_ms`, their statistics after the same warm-up steps, and the
    calls per collective. Nothing is added to a run without collectives. `data_spans()`:
    per step, the spans of its data wait (analyse.throughput.data_spans, its own rule)."""
    rec = profile.run.records.get("communication") or {}
    if not rec.get("calls"):
        return
    calls = completed_calls(profile)
    rows = summary["per_step"]
    comm = per_step_ms(profile, calls)
    n = len(rows["wall_ms"])
    comm = (comm + [None] * n)[:n]       # one value per step row
    merged = _merged(calls)
    windows = (data_spans() + [[]] * n)[:n]
    both = [overlap_ms(merged, w) for w in windows]   # in flight during the data wait
    compute = []
    for wall, data, c, o in zip(rows["wall_ms"], rows["data_ms"], comm, both):
        compute.append(None if wall is None or c is None
                       else max(0.0, wall - (data or 0.0) - c + min(o, c, data or 0.0)))
    rows["comm_ms"] = [None if c is None else round(c, 4) for c in comm]
    rows["compute_ms"] = [None if c is None else round(c, 4) for c in compute]
    rows["comm_in_data_ms"] = [round(o, 4) for o in both]
    keep = slice(summary["warmup_steps_excluded"], n)
    st = summary["stats"]
    walls = [w for w, c in zip(rows["wall_ms"][keep], comm[keep]) if w and c is not None]
    for key, values in (("comm_ms", comm), ("compute_ms", compute),
                        ("comm_in_data_ms", both)):
        st[key] = _stats([c for c in values[keep] if c is not None])
        if st[key] is not None and sum(walls) > 0:   # of the measured time, as the phases'
            st[key]["share"] = sum(c for c, w in zip(values[keep], rows["wall_ms"][keep])
                                   if c is not None and w) / sum(walls)
    st["comm_fraction"] = _stats([c / w for c, w in zip(comm[keep], rows["wall_ms"][keep])
                                  if c is not None and w])
    summary["communication"] = {
        "by_op": by_op(calls), "calls": len(rec["calls"]),
        "incomplete_calls": len(rec["calls"]) - len(calls),
        "clock": "host (launch to completion)", "notes": list(rec.get("notes") or ())}
