"""The profiles of one distributed job (one file per rank) merged into one answer.

Per rank: its peak, when it peaked (step, phase, module, op) and what was alive then by
category; across ranks: which rank peaked highest, the imbalance (highest rank peak over the
median rank peak) and the findings, each stated once with the ranks it was seen on and its
bytes per rank; per rank its time per step, communication share and samples/s, the slowest
rank and the ranks that wait for it, and which rank failed first (analyse.rank_timing). A pure
function of the Profiles: the files are read by the caller.

A profile says which rank it is in its meta (`rank`, `world_size`, and where known
`local_rank`, `dist_backend`, `run_id`), as memprof.track() writes it under torchrun.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..finding import SEVERITY_ORDER, Finding
from ..profile import Profile
from .rank_timing import first_failure, rank_timing, stragglers

# what must agree between the files of one job (the first key present in every file decides)
SAME_RUN_KEYS = ("run_id", "model_class", "dist_backend", "torch")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*(?:[KMGT]i?B|B)\b)?")


@dataclass
class RankRow:
    """One rank of the job, as the merged report shows it."""
    rank: int
    source: str
    device: str
    peak: int
    peak_event: dict | None      # step, phase, module, op, time_s (since that rank's start)
    by_category: dict[str, int]  # alive at that rank's peak
    end_bytes: int
    steps: int                   # finished steps
    events: int
    local_rank: int | None = None
    partial_step: bool = False   # work after the last step boundary
    error: str | None = None     # what the rank's tracked code raised
    # saved while the rank ran on and never replaced by its end (killed outright, or still
    # running): the steps ended by then (memprof.track_autosave)
    unfinished_at: int | None = None
    error_at: float | None = None    # when the error left its block (unix time, s)
    timing: dict | None = None       # analyse.rank_timing.rank_timing

    @property
    def steps_label(self) -> str:
        return f"{self.steps} + partial" if self.partial_step else str(self.steps)

    def as_dict(self) -> dict:
        return {"rank": self.rank, "source": self.source, "device": self.device,
                "peak_bytes": self.peak, "peak_event": self.peak_event,
                "by_category_at_peak": self.by_category, "end_bytes": self.end_bytes,
                "steps": self.steps, "partial_step": self.partial_step,
                "events": self.events, "local_rank": self.local_rank, "error": self.error,
                "unfinished_at": self.unfinished_at, "error_unix_s": self.error_at,
                "timing": self.timing}


@dataclass
class RankFinding:
    """A finding seen on one or more ranks: stated once, with its bytes on each rank."""
    kind: str
    severity: str                # the worst seen on any rank
    message: str                 # as the lowest rank stated it
    fix: str
    holder: str | None
    bytes_by_rank: dict[int, int] = field(default_factory=dict)

    @property
    def ranks(self) -> list[int]:
        return sorted(self.bytes_by_rank)

    @property
    def on_ranks(self) -> str:
        """'on rank 3', 'on ranks 0-7', 'on ranks 0-2, 5'."""
        label = rank_ranges(self.ranks)
        return f"on rank {label}" if len(self.ranks) == 1 else f"on ranks {label}"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "severity": self.severity, "message": self.message,
                "fix": self.fix, "holder": self.holder, "ranks": self.ranks,
                "on_ranks": self.on_ranks,
                "bytes_by_rank": {str(r): b for r, b in sorted(self.bytes_by_rank.items())}}


@dataclass
class MergedRanks:
    """Every rank of one job; `profiles[i]` is the profile of `ranks[i]` (in rank order)."""
    world_size: int
    backend: str | None
    ranks: list[RankRow]
    findings: list[RankFinding]
    profiles: list[Profile]
    stragglers: dict | None = None      # analyse.rank_timing.stragglers
    first_failure: dict | None = None   # analyse.rank_timing.first_failure

    @property
    def missing_ranks(self) -> list[int]:
        have = {r.rank for r in self.ranks}
        return [r for r in range(self.world_size) if r not in have]

    @property
    def peak_row(self) -> RankRow:
        """The rank with the highest peak (the lowest such rank on a tie)."""
        return max(self.ranks, key=lambda r: (r.peak, -r.rank))

    @property
    def median_peak(self) -> float:
        return float(np.median([r.peak for r in self.ranks]))

    @property
    def imbalance(self) -> float | None:
        """Highest rank peak over the median rank peak (1.0: balanced); None if all are 0."""
        med = self.median_peak
        return self.peak_row.peak / med if med > 0 else None

    @property
    def categories(self) -> list[str]:
        """Every category seen at any rank's peak, in first-seen order."""
        out: dict[str, None] = {}
        for r in self.ranks:
            out.update(dict.fromkeys(r.by_category))
        return list(out)

    def summary(self) -> dict:
        """Plain, JSON-serialisable answers (`memprof report a.rank*.memprof --json`)."""
        top = self.peak_row
        return {"world_size": self.world_size, "backend": self.backend,
                "ranks_present": [r.rank for r in self.ranks],
                "missing_ranks": self.missing_ranks,
                "peak_rank": top.rank, "peak_bytes": top.peak, "peak_event": top.peak_event,
                "median_peak_bytes": self.median_peak, "imbalance": self.imbalance,
                "ranks": [r.as_dict() for r in self.ranks],
                "errors": {str(r.rank): r.error for r in self.ranks if r.error},
                "first_failure": self.first_failure, "stragglers": self.stragglers,
                "findings": [f.as_dict() for f in self.findings]}


def rank_ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 3, 5] -> '0-3, 5'."""
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(str(r) if r == start else f"{start}-{r}")
            start = None
    return ", ".join(parts)


def merge_ranks(profiles: list[Profile], sources: list[str] | None = None) -> MergedRanks:
    """The profiles of one job's ranks, merged. `sources` names each profile in errors
    (file paths). Raises ValueError, one line, for a profile without a rank, ranks of
    different world sizes, a rank given twice, or files of different runs."""
    if not profiles:
        raise ValueError("profiles: expected the profiles of one job's ranks, got none")
    sources = list(sources) if sources is not None else [f"profile {i}"
                                                         for i in range(len(profiles))]
    if len(sources) != len(profiles):
        raise ValueError(f"sources: expected one name per profile ({len(profiles)}), got "
                         f"{len(sources)}")
    ranks = [_rank_of(p, s) for p, s in zip(profiles, sources)]
    _check_one_job(profiles, sources, ranks)
    order = sorted(range(len(profiles)), key=lambda i: ranks[i][0])
    profiles = [profiles[i] for i in order]
    sources = [sources[i] for i in order]
    rows = [_row(p, s) for p, s in zip(profiles, sources)]
    return MergedRanks(world_size=ranks[0][1], backend=profiles[0].meta.get("dist_backend"),
                       ranks=rows, findings=merge_findings([(r.rank, p.findings)
                                                            for r, p in zip(rows, profiles)]),
                       profiles=profiles,
                       stragglers=stragglers({r.rank: r.timing for r in rows}),
                       first_failure=first_failure(rows))


def merge_findings(per_rank: list[tuple[int, list[Finding]]]) -> list[RankFinding]:
    """One RankFinding per distinct finding. The same kind and holder is the same finding on
    another rank (a leak's message differs between ranks with its bytes and what else that
    rank's analyses saw); without a holder, the same kind and message up to its numbers
    (byte counts, steps) is."""
    merged: dict[tuple, RankFinding] = {}
    for rank, found in sorted(per_rank, key=lambda x: x[0]):
        seen_here: dict[tuple, int] = {}
        for f in found:
            base = (f.kind, f.holder) if f.holder else (f.kind, _NUMBER.sub("#", f.message))
            n = seen_here[base] = seen_here.get(base, 0) + 1
            key = base + (n,)     # a finding twice on one rank stays two findings
            got = merged.get(key)
            if got is None:
                merged[key] = RankFinding(kind=f.kind, severity=f.severity, message=f.message,
                                          fix=f.fix, holder=f.holder,
                                          bytes_by_rank={rank: int(f.bytes)})
                continue
            got.bytes_by_rank[rank] = int(f.bytes)
            if SEVERITY_ORDER.get(f.severity, 9) < SEVERITY_ORDER.get(got.severity, 9):
                got.severity = f.severity
    for f in merged.values():   # its figures are one rank's ("pinning 7.50 KiB" beside 15.00)
        if len(set(f.bytes_by_rank.values())) > 1:
            f.message = f"as rank {f.ranks[0]} states it: {f.message}"
    return sorted(merged.values(), key=lambda f: (SEVERITY_ORDER.get(f.severity, 9),
                                                  -max(f.bytes_by_rank.values()), f.ranks))


def _rank_of(profile: Profile, source: str) -> tuple[int, int]:
    if not isinstance(profile, Profile):
        raise TypeError(f"{source}: expected a memprof Profile, got {type(profile).__name__}")
    meta = profile.meta
    rank, world = meta.get("rank"), meta.get("world_size")
    if not _is_int(rank) or not _is_int(world):
        raise ValueError(f"{source}: not a rank of a torchrun job (no rank/world_size in its "
                         "meta); several profiles are merged only as the ranks of one job "
                         "(<name>.rank<R>.memprof): report the others one at a time")
    if not 0 <= rank < world:
        raise ValueError(f"{source}: rank {rank} with world size {world}; expected a rank in "
                         f"[0, {world})")
    return int(rank), int(world)


def _check_one_job(profiles: list[Profile], sources: list[str],
                   ranks: list[tuple[int, int]]) -> None:
    worlds = {w for _, w in ranks}
    if len(worlds) > 1:
        a = next(i for i, (_, w) in enumerate(ranks) if w == ranks[0][1])
        b = next(i for i, (_, w) in enumerate(ranks) if w != ranks[0][1])
        raise ValueError(f"world sizes differ: {sources[a]} has {ranks[a][1]}, {sources[b]} "
                         f"has {ranks[b][1]}; expected the files of one job")
    first: dict[int, int] = {}
    for i, (rank, _) in enumerate(ranks):
        if rank in first:
            raise ValueError(f"rank {rank} given twice: {sources[first[rank]]} and "
                             f"{sources[i]}; expected one file per rank")
        first[rank] = i
    for key in SAME_RUN_KEYS:
        values = [p.meta.get(key) for p in profiles]
        if any(v is None for v in values):
            continue
        for i, v in enumerate(values):
            if v != values[0]:
                raise ValueError(f"files of different runs: {sources[0]} has {key} "
                                 f"{values[0]!r}, {sources[i]} has {v!r}; expected the "
                                 "files of one job")


def _row(profile: Profile, source: str) -> RankRow:
    live_end = profile.live_bytes()
    local = profile.meta.get("local_rank")
    return RankRow(rank=int(profile.meta["rank"]), source=source, device=profile.device,
                   peak=profile.peak, peak_event=profile.peak_event,
                   by_category=profile.breakdown("category"),
                   end_bytes=int(live_end[-1]) if live_end.size else 0,
                   steps=len(profile.steps) - profile.partial_last_step,
                   events=int(profile.memory.size),
                   local_rank=int(local) if _is_int(local) else None,
                   partial_step=profile.partial_last_step, error=profile.meta.get("error"),
                   unfinished_at=_unfinished_at(profile.meta.get("partial")),
                   error_at=_number(profile.meta.get("error_unix_s")),
                   timing=rank_timing(profile))


def _unfinished_at(partial) -> int | None:
    return int(partial.get("steps_ended", 0)) if isinstance(partial, dict) else None


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
