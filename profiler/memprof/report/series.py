"""What the plotting exports share: live bytes per category at chosen events, downsampled so
that no peak is lost, and the steps and phases of a profile as time spans.

Downsampling (`envelope`): the run's time is cut into buckets; each bucket keeps the event
with the most live bytes and the one with the fewest (in time order), plus every event in
`keep` (the profile's peak, each step's peak, the first and the last event). The maximum of
the kept points over any range of whole buckets is therefore the true maximum there, and the
profile's peak is a kept point with its exact bytes per category. A profile of millions of
events becomes a few thousand points, each still a real event (its step, phase, op, module).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..profile import Profile
from ..record.events import CATEGORIES
from .ending import ending

CHUNK = 1 << 20          # events per chunk when summing categories (bounded memory)
PHASE_MARKS = {"forward_start": "forward", "backward_start": "backward",
               "optimizer_start": "optimizer"}
PHASE_ENDS = {"forward_end": "forward", "backward_end": "backward", "step": "optimizer"}


@dataclass
class Series:
    """Live bytes by category after each of the chosen memory events."""
    index: np.ndarray        # memory positions (Profile.memory), increasing
    t_us: np.ndarray         # microseconds since the profile's t0
    by_category: np.ndarray  # (len(index), len(CATEGORIES)) int64

    @property
    def total(self) -> np.ndarray:
        return self.by_category.sum(axis=1)


def t0_ns(profile: Profile) -> int:
    """Time zero of every exported time axis: the tracking start, else the first event."""
    t0 = profile.meta.get("t0_ns")
    if t0 is None:
        t0 = _first_t_ns(profile)
    return int(t0 if t0 is not None else 0)


def _first_t_ns(profile: Profile) -> int | None:
    """Time of the first record, from the two streams' heads (merging them into
    `profile.events` would copy the whole run for one number)."""
    streams = profile.run.streams
    heads = [int(a["t_ns"][0]) for a in (streams.memory, streams.side) if a.size]
    return min(heads) if heads else None


def envelope(t: np.ndarray, values: np.ndarray, buckets: int,
             keep: np.ndarray | list = ()) -> np.ndarray:
    """Indices of the per-bucket maximum and minimum of `values` (buckets of equal time),
    with every index in `keep`; sorted, unique. All indices when there are few values."""
    n = values.size
    keep = np.asarray(keep, dtype=np.int64)
    keep = keep[(keep >= 0) & (keep < n)]
    if n <= 2 * buckets:
        return np.arange(n, dtype=np.int64)
    tt = np.maximum.accumulate(t.astype(np.int64))   # threads may interleave out of order
    span = max(int(tt[-1] - tt[0]), 1)
    bucket = ((tt - tt[0]) * (buckets - 1) // span).astype(np.int64)
    starts = np.flatnonzero(np.diff(bucket, prepend=-1))
    counts = np.diff(np.append(starts, n))
    pos = np.arange(n, dtype=np.int64)
    picked = [keep, [n - 1]]
    for reduce in (np.maximum, np.minimum):
        best = np.repeat(reduce.reduceat(values, starts), counts)
        first = np.minimum.reduceat(np.where(values == best, pos, n), starts)
        picked.append(first)
    return np.unique(np.concatenate(picked))


def category_live(profile: Profile, idx: np.ndarray) -> np.ndarray:
    """Live bytes per category after each memory position in `idx` (sorted), summed in
    chunks so a profile of tens of millions of events needs no per-category copy of it."""
    size = profile.effective_size
    cat = profile.category
    n, k = size.size, len(CATEGORIES)
    out = np.zeros((idx.size, k), dtype=np.int64)
    running = np.zeros(k, dtype=np.int64)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        lo, hi = np.searchsorted(idx, [start, stop])
        s, c = size[start:stop], cat[start:stop]
        for code in range(k):
            part = np.where(c == code, s, 0)
            if hi > lo:
                out[lo:hi, code] = running[code] + np.cumsum(part)[idx[lo:hi] - start]
            running[code] += int(part.sum())
    return out


def step_peaks(profile: Profile) -> list[int]:
    """Memory position of each step's (first) peak."""
    live = profile.live_bytes()
    return [s.start + int(np.argmax(live[s.start:s.end])) for s in profile.steps if s.end > s.start]


def series(profile: Profile, buckets: int | None = None,
           idx: np.ndarray | None = None) -> Series:
    """The timeline at `idx`, or downsampled to about 2 x `buckets` points keeping every peak
    (no downsampling when buckets is None)."""
    mem = profile.memory
    if idx is None:
        if buckets is None:
            idx = np.arange(mem.size, dtype=np.int64)
        else:
            keep = [profile.peak_index, 0] + step_peaks(profile)
            idx = envelope(mem["t_ns"], profile.live_bytes(), buckets, keep)
    idx = np.asarray(idx, dtype=np.int64)
    t_us = (mem["t_ns"][idx].astype(np.int64) - t0_ns(profile)) // 1000
    return Series(index=idx, t_us=t_us, by_category=category_live(profile, idx))


# ------------------------------------------------------------------ steps and phases in time
def phase_spans(profile: Profile) -> list[tuple[int, int, str]]:
    """(start ns, end ns, phase) for forward, backward and optimizer, never overlapping: a
    phase ends at its end marker or where the next phase starts, whichever comes first."""
    spans, open_ = [], None
    for m in profile.markers():
        label, t = m["label"], m["t_ns"]
        if label in PHASE_MARKS:
            if open_ is not None:
                spans.append((open_[0], t, open_[1]))
            open_ = (t, PHASE_MARKS[label])
        elif open_ is not None and PHASE_ENDS.get(label) == open_[1]:
            spans.append((open_[0], t, open_[1]))
            open_ = None
    return [s for s in spans if s[1] >= s[0]]


def step_spans(profile: Profile) -> list[tuple[int, int, int]]:
    """(start ns, end ns, step index) of each step of the steps table (`profile.steps`): from
    the previous boundary (the first step: from the first event) to its own; a partial last
    step (work after the last boundary, a run that raised in it) up to the last record. Steps
    whose boundaries were kept past the event capacity but whose memory was not have no row
    in the steps table, and no span (the trace and the timeline showed 6 steps, the table 3)."""
    bounds = [m["t_ns"] for m in profile.markers("step")]
    positions = profile.marker_positions("step")
    steps = profile.steps
    partial = profile.partial_last_step
    first = _first_t_ns(profile)
    if first is None:
        return []
    start, out = first, []
    for step in steps[:len(steps) - partial]:
        # its boundary: the first marker at its end (a step that allocated nothing has no
        # row, so the table's index is not the marker's: the spans shifted after one)
        k = int(np.searchsorted(positions, step.end, "left"))
        if k >= len(bounds):
            break
        out.append((min(start, bounds[k]), bounds[k], step.index))
        start = bounds[k]
    if partial:
        end = _last_t_ns(profile)
        out.append((min(start, end), end, steps[-1].index))
    return out


def _last_t_ns(profile: Profile) -> int:
    streams = profile.run.streams
    return max(int(a["t_ns"][-1]) for a in (streams.memory, streams.side) if a.size)


def step_notes(profile: Profile) -> dict[int, tuple[str, str]]:
    """{step index: (label, sentence)} for a last step that did not end as the others: cut
    by the event capacity (its memory only partly recorded), or partial - and how the run
    ended there (it raised: the trace gave the step no slice, the exception only in its
    metadata)."""
    steps = profile.steps
    if not steps:
        return {}
    labels, sentences = [], []
    if profile.truncated:
        later = len(profile.markers("step")) - (len(steps) - profile.partial_last_step)
        labels.append("cut by the capacity")
        sentences.append(
            f"the event log filled up (capacity {int(profile.meta.get('capacity', 0)):,} "
            "events) in or right after this step: its memory is recorded only up to there"
            + (f"; {later} later step(s) ran and were not recorded" if later > 0 else ""))
    if profile.partial_last_step:
        error = profile.meta.get("error")
        labels.append("partial")
        sentences.append(ending(str(error))[0] if error else
                         "work after the last step boundary (an evaluation pass, a loop cut "
                         "short), not a finished step")
    if not labels:
        return {}
    return {steps[-1].index: (", ".join(labels), "; ".join(sentences))}
