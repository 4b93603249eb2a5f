"""The real CUDA allocator's segments in the memory snapshot of a CUDA run
(record/cuda_segments.py recorded them): segment actions placed among memprof's events, and
the segments alive at the end with memprof's frames on their blocks.

memprof's events carry the real block addresses on CUDA; the allocator's segment actions
carry Unix times. An action is placed by its time (through the clock pair read when the
block began), then moved so the viewer's invariant holds whatever the clocks' slack: a
segment is allocated before the first block memprof saw inside it, and freed after the
last such block was freed.
"""
from __future__ import annotations

import numpy as np

from ..plan.allocator import SEGMENT_ACTIONS
from ..profile import Profile
from ..record.events import DEVICE_CUDA

# the codes report/snapshot.py decodes with plan.allocator.SEGMENT_ACTIONS
ACTION_CODES = {name: code for code, name in SEGMENT_ACTIONS.items()}
ADDING = (ACTION_CODES["segment_alloc"], ACTION_CODES["segment_map"])
SOURCE = "the CUDA caching allocator (torch.cuda.memory._snapshot at the end of the block)"


def recorded_segments(profile: Profile) -> dict | None:
    """The cuda_segments record of a CUDA run, when it has segments; else None."""
    rec = profile.run.records.get("cuda_segments")
    if profile.device_type != DEVICE_CUDA or not isinstance(rec, dict) or not rec.get("segments"):
        return None
    return rec


def real_layout(profile: Profile, keep: np.ndarray, rec: dict) -> dict:
    """The layout report/snapshot.py draws from (like plan.allocator's replay layout): each
    block at its real address; segments = the recorded actions, each with the kept memory
    row it comes before (`event`; past the last row: after every row)."""
    mem = profile.memory
    size = mem["size"]
    ptr = mem["ptr"].astype(np.uint64)
    n = size.size
    actions = rec.get("actions") or []
    clock = rec.get("clock") or {}
    offset = int(clock.get("unix_ns", 0)) - int(clock.get("monotonic_ns", 0))
    t_act = np.array([int(a["time_us"]) * 1000 - offset for a in actions], dtype=np.int64)
    code = np.array([ACTION_CODES[a["action"]] for a in actions], dtype=np.int8)
    addr = np.array([int(a["addr"]) for a in actions], dtype=np.uint64)
    span = np.array([int(a["size"]) for a in actions], dtype=np.int64)
    rows = np.flatnonzero(keep)
    t_rows = np.maximum.accumulate(mem["t_ns"][rows].astype(np.int64)) if rows.size else rows
    pos = _onto_rows(rows, np.searchsorted(t_rows, t_act, side="left"), n)   # by time
    pos = _honour_blocks(pos, code, addr, span, ptr, size, keep, profile.free_of, n)
    pos = _onto_rows(rows, np.searchsorted(rows, pos, side="left"), n)
    return {"block_addr": ptr, "block_size": np.abs(size),
            "segments": {"event": pos, "action": code, "addr": addr, "size": span,
                         "small": np.array([s <= (2 << 20) for s in span.tolist()], dtype=bool)}}


def _onto_rows(rows: np.ndarray, at: np.ndarray, n: int) -> np.ndarray:
    """rows[at], and n (after every row) where `at` is past the last row."""
    if not rows.size:
        return np.full(at.size, n, dtype=np.int64)
    return np.where(at < rows.size, rows[np.minimum(at, rows.size - 1)], n).astype(np.int64)


def _honour_blocks(pos, code, addr, span, ptr, size, keep, free_of, n) -> np.ndarray:
    """Place the actions, in their real order, as near their times (`pos`) as the blocks
    allow. An allocation comes before the first block allocated inside its range after the
    previous action (the block it was made for). A free comes after that block's free, at a
    position where nothing inside its range is alive (the one nearest its time)."""
    allocs = np.flatnonzero(keep & (size > 0))
    by_addr = np.argsort(ptr[allocs], kind="stable")
    sorted_ptr, sorted_row = ptr[allocs][by_addr], allocs[by_addr]
    ends = free_of[sorted_row]
    sorted_end = np.where(ends < 0, n, ends)   # alive at positions born+1 .. end (inclusive)
    adding = np.isin(code, ADDING)
    added_at: dict[int, int] = {}
    out = np.empty_like(pos)
    cur = 0
    for k in range(pos.size):
        a = int(addr[k])
        i, j = np.searchsorted(sorted_ptr, [a, a + int(span[k])])
        born, dies = sorted_row[i:j], sorted_end[i:j]
        t = int(pos[k])
        if adding[k]:
            nxt = born[born >= cur]
            out[k] = cur = max(cur, min(t, int(nxt.min()) if nxt.size else n))
            added_at[a] = cur
            continue
        lo = cur
        own = born >= added_at.pop(a, 0)
        if own.any():                      # the block the segment was allocated for
            lo = max(lo, int(dies[own][np.argmin(born[own])]) + 1)
        # ... and before the block the next allocation (in the real order) was made for
        nxt = np.flatnonzero(adding[k + 1:])
        cap = n
        if nxt.size:
            m = k + 1 + int(nxt[0])
            i2, j2 = np.searchsorted(sorted_ptr, [int(addr[m]), int(addr[m]) + int(span[m])])
            later = sorted_row[i2:j2][sorted_row[i2:j2] >= lo]
            cap = int(later.min()) if later.size else n
        out[k] = cur = _nearest_gap(born, dies, lo, t, n, cap)
    return out


def _nearest_gap(born, dies, lo: int, t: int, n: int, cap: int) -> int:
    """The position in [lo, cap] (if there is one, else >= lo) nearest t at which none of
    the blocks (alive at positions born+1 .. dies) is alive."""
    order = np.argsort(born, kind="stable")
    s, e = born[order] + 1, dies[order]
    if s.size:
        reach = np.maximum.accumulate(e)
        open_ = np.flatnonzero(s[1:] > reach[:-1] + 1)
        g_start = np.concatenate([[0], reach[:-1][open_] + 1, [reach[-1] + 1]])
        g_end = np.concatenate([[s[0] - 1], s[1:][open_] - 1, [n]])
    else:
        g_start, g_end = np.array([0]), np.array([n])
    ok = g_end >= lo
    g_start, g_end = np.maximum(g_start[ok], lo), g_end[ok]
    if not g_start.size:
        return max(lo, n)
    within = g_start <= cap
    if within.any():
        g_start, g_end = g_start[within], np.minimum(g_end[within], cap)
    dist = np.where(t < g_start, g_start - t, np.where(t > g_end, t - g_end, 0))
    best = int(np.argmin(dist))
    return int(min(max(t, g_start[best]), g_end[best]))


def real_segments(profile: Profile, keep: np.ndarray, rec: dict, frames, device: int) -> list:
    """The recorded segments alive at the end, their blocks named by memprof's frames where
    memprof saw the allocation at that address."""
    mem = profile.memory
    alive = np.flatnonzero(keep & (mem["size"] > 0) & (profile.free_of < 0))
    row_at = dict(zip(mem["ptr"][alive].tolist(), alive.tolist()))
    out = []
    for s in rec["segments"]:
        blocks = []
        for b in s["blocks"]:
            row = row_at.get(b["address"]) if b["state"] != "inactive" else None
            blocks.append(dict(b, frames=frames(row) if row is not None else []))
        used = [b for b in blocks if b["state"] == "active_allocated"]
        active = [b for b in blocks if b["state"] != "inactive"]
        out.append({"device": device, "address": s["address"], "total_size": s["total_size"],
                    "stream": s["stream"], "allocated_size": sum(b["size"] for b in used),
                    "active_size": sum(b["size"] for b in active),
                    "requested_size": sum(b["requested_size"] for b in used),
                    "segment_type": s["segment_type"],
                    "segment_pool_id": tuple(s["segment_pool_id"]),
                    "is_expandable": s["is_expandable"], "blocks": blocks,
                    "frames": [{"filename": frames.device, "line": 0,
                                "name": "segment (CUDA caching allocator)"}]})
    return out
