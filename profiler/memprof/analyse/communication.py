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
from ..profile_schema import PAUSES
from ..stats import describe as _stats

_DATA_LABELS = ("forward_start", "forward_end", "backward_start", "backward_end",
                "optimizer_start", "step", "update_start", "update_end")


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


def data_windows(profile: Profile) -> list[list[tuple[int, int]]]:
    """Per step, the [start, end] ns intervals of its data wait (before the forward), by
    analyse.throughput's rule (its phase table sums their lengths): from the step's start
    (after memprof's own pause there) to the first forward, and from the end of a backward to
    the next forward (a micro-batch fetched). The first step has none: it has no start."""
    pauses: dict[int, float] = {}
    for name, key in PAUSES:
        for n, sec in (profile.run.records.get(name) or {}).get(key, ()):
            pauses[int(n)] = pauses.get(int(n), 0.0) + float(sec)
    out: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    gap, state, updating = None, "outside", False
    for m in profile.markers():
        label, t = m["label"], m["t_ns"]
        if label not in _DATA_LABELS:
            continue
        if label == "update_start":     # (carries when the update began)
            label, t = "optimizer_start", m["value"]
        if label == "step":
            out.append(current)
            current, state, updating = [], "outside", False
            gap = t + int(pauses.get(len(out), 0.0) * 1e9)
        elif label == "update_end":
            if updating:
                gap, state, updating = m["value"], "after_backward", False
        elif label == "forward_start":
            if gap is not None and state in ("outside", "after_backward"):
                current.append((gap, t))
            gap, state, updating = None, "forward", False
        elif label == "forward_end":
            state = "after_forward"
        elif label == "backward_start":
            state = "backward"
        elif label == "backward_end":
            gap, state = t, "after_backward"
        elif label == "optimizer_start":
            gap, state, updating = None, "optimizer", True
    return out


def overlap_ms(merged: np.ndarray, windows: list[tuple[int, int]]) -> float:
    """Milliseconds of the disjoint [start, end] rows `merged` inside the windows."""
    if merged.size == 0 or not windows:
        return 0.0
    w = np.array(windows, dtype=np.int64)
    lo = np.maximum(merged[None, :, 0], w[:, None, 0])
    hi = np.minimum(merged[None, :, 1], w[:, None, 1])
    return float(np.clip(hi - lo, 0, None).sum()) * 1e-6


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
    merged = _merged(calls)
    windows = (data_windows(profile) + [[]] * n)[:n]
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
