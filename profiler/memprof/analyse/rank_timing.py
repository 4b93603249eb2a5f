"""Time per rank of a distributed job, who waits for whom, and which rank failed first.

Each rank's numbers are its own throughput summary's (analyse.throughput.summarize, with the
communication that analyse.communication adds): median step time, the share of the measured
time with a collective in flight, samples/s. In a data-parallel job every rank's step lasts
about as long as the slowest rank's - a rank done with its own work waits in the next
collective - so the step time does not name a straggler; its own work does: the time per step
with no collective in flight (step - communication). The slowest rank has the most; the ranks
that wait for it spend the difference in communication.

Which rank failed first: each rank's profile notes when its block was left by an error
(meta `error_unix_s`, the wall clock the ranks share); a rank stopped by the launcher's
SIGTERM (torchrun stops the others once one fails) failed because another did.
"""
from __future__ import annotations

from typing import Any

from ..profile import Profile
from ..stats import describe
from .throughput import summarize

#: the slowest rank's own work per step over the fastest rank's at or above which the slowest
#: is named a straggler and the ranks with at most its own work / this wait for it
STRAGGLER_RATIO = 1.25


def rank_timing(profile: Profile) -> dict[str, Any] | None:
    """A rank's step time (median ms), own work (median ms of step - communication),
    communication (median ms and share of the measured time), samples/s over the measured
    steps and how many were measured; None for a rank without a finished step."""
    summary = summarize(profile)
    st = summary["stats"]
    if not summary["steps"] or st.get("wall_ms") is None:
        return None
    rows = summary["per_step"]
    keep = slice(summary["warmup_steps_excluded"], None)
    walls = rows["wall_ms"][keep]
    comms = (rows.get("comm_ms") or [0.0] * len(rows["wall_ms"]))[keep]
    own = describe([w - c for w, c in zip(walls, comms) if w is not None and c is not None])
    comm = st.get("comm_ms")
    return {"step_ms": st["wall_ms"]["median"],
            "own_work_ms": own["median"] if own else None,
            "comm_ms": comm["median"] if comm else None,
            "comm_share": comm.get("share") if comm else None,
            "samples_per_s": summary.get("samples_per_s_overall"),
            "steps_measured": summary["steps_measured"]}


def stragglers(timing_by_rank: dict[int, dict | None]) -> dict[str, Any] | None:
    """The rank with the most own work per step, and whether it holds the others back:
    `straggler` when its own work is STRAGGLER_RATIO times the fastest rank's or more, then
    `waiting_ranks`, those with at most its own work / STRAGGLER_RATIO. None with fewer than
    two timed ranks."""
    own = {r: t["own_work_ms"] for r, t in timing_by_rank.items()
           if t is not None and t.get("own_work_ms") is not None}
    if len(own) < 2:
        return None
    slowest = max(own, key=lambda r: (own[r], -r))
    fastest = min(own.values())
    ratio = own[slowest] / fastest if fastest > 0 else None
    # ranks that never had a collective in flight wait for nobody (each trained alone: a
    # script that never set up torch.distributed read "waiting for it: rank 1")
    talks = {r for r, t in timing_by_rank.items() if t is not None and t.get("comm_ms")}
    straggler = bool(talks) and (ratio is None or ratio >= STRAGGLER_RATIO)
    waiting = sorted(r for r, ms in own.items() if straggler and r != slowest and r in talks
                     and ms * STRAGGLER_RATIO <= own[slowest])
    return {"slowest_rank": slowest, "own_work_ms": own[slowest],
            "ratio_to_fastest": ratio, "straggler": straggler, "waiting_ranks": waiting}


def stopped_by_launcher(error: str | None) -> bool:
    """The error of a rank that torchrun (or `memprof run`) stopped once another failed."""
    return bool(error) and "SIGTERM" in error


def first_failure(rows) -> dict[str, Any] | None:
    """Which of the ranks that failed (an error, or killed outright: a profile saved while it
    ran and never replaced) failed first: {rank or None, basis (a sentence), candidates}.
    Ranks stopped by the launcher's SIGTERM are left out where another failed; of the rest,
    the earliest error time decides where every one has a time."""
    failed = [r for r in rows if r.error or r.unfinished_at is not None]
    if not failed:
        return None
    causes = [r for r in failed if not stopped_by_launcher(r.error)] or failed
    timed = sorted((r for r in causes if r.error_at is not None),
                   key=lambda r: (r.error_at, r.rank))
    untimed = [r for r in causes if r.error_at is None]
    stopped = len(failed) - len(causes)
    after = f"; {stopped} stopped by SIGTERM after it" if stopped else ""
    if len(causes) == 1:
        first = causes[0]
        basis = ("the only rank that failed" if not stopped else
                 "the others were stopped by SIGTERM (the launcher stops them once one fails)")
    elif timed and not untimed:
        first = timed[0]
        gap = timed[1].error_at - first.error_at
        basis = (f"its error was recorded first, {gap:.2f} s before rank {timed[1].rank}'s"
                 + after)
    else:
        first = None
        basis = ("not known: rank(s) " + ", ".join(str(r.rank) for r in untimed)
                 + " left no time of failure (killed outright, or a profile from before "
                   "memprof noted it)")
    return {"rank": None if first is None else first.rank, "basis": basis,
            "candidates": sorted(r.rank for r in causes)}
