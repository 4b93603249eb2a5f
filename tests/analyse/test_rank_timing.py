"""Which rank failed first, from what the ranks' profiles say (analyse.rank_timing): the
cases a 2-rank job in tests/distributed does not reach on every run (a rank stopped by the
launcher's SIGTERM, a rank killed outright without a time)."""
from __future__ import annotations

from memprof.analyse.rank_timing import first_failure, stragglers
from memprof.analyse.ranks import RankRow


def row(rank: int, error: str | None = None, at: float | None = None,
        unfinished: int | None = None) -> RankRow:
    return RankRow(rank=rank, source=f"r{rank}", device="cpu", peak=0, peak_event=None,
                   by_category={}, end_bytes=0, steps=3, events=0, error=error,
                   unfinished_at=unfinished, error_at=at)


def test_the_earliest_error_is_first():
    ff = first_failure([row(0, "RuntimeError: Connection closed by peer", 10.5),
                        row(1, "RuntimeError: boom", 10.0), row(2)])
    assert ff["rank"] == 1 and ff["candidates"] == [0, 1]
    assert "0.50 s before rank 0's" in ff["basis"]


def test_a_rank_stopped_by_sigterm_is_not_the_cause():
    # the rank killed outright has no time; the other was stopped by the launcher
    ff = first_failure([row(0, "Terminated: signal SIGTERM", 10.0), row(1, unfinished=4)])
    assert ff["rank"] == 1 and "SIGTERM" in ff["basis"]


def test_without_every_time_it_is_not_guessed():
    ff = first_failure([row(0, "RuntimeError: x", 10.0), row(1, unfinished=4)])
    assert ff["rank"] is None and "rank(s) 1" in ff["basis"]
    assert first_failure([row(0), row(1)]) is None


def test_balanced_ranks_name_no_straggler():
    even = {0: {"own_work_ms": 10.0}, 1: {"own_work_ms": 11.0}}
    assert stragglers(even)["straggler"] is False and stragglers(even)["waiting_ranks"] == []
    uneven = {0: {"own_work_ms": 10.0, "comm_ms": 20.0}, 1: {"own_work_ms": 30.0, "comm_ms": 1.0},
              2: {"own_work_ms": 28.0, "comm_ms": 2.0}}
    st = stragglers(uneven)
    assert (st["slowest_rank"], st["waiting_ranks"]) == (1, [0])
    # ranks without a collective in flight wait for nobody (each trained alone)
    alone = {r: {"own_work_ms": t["own_work_ms"]} for r, t in uneven.items()}
    st = stragglers(alone)
    assert st["slowest_rank"] == 1 and st["straggler"] is False and st["waiting_ranks"] == []
    assert stragglers({0: {"own_work_ms": 10.0}, 1: None}) is None


def test_time_in_flight_inside_windows_by_prefix_sums_is_the_brute_force_sum():
    """The overlap of collectives with steps and data waits, by prefix sums (a windows x calls
    matrix took seconds and gigabytes on a long run), against the plain sum."""
    import numpy as np
    from memprof.analyse.communication import _covered_ns, _merged
    rng = np.random.default_rng(0)
    t0 = np.sort(rng.integers(0, 10_000, 300))
    calls = [["all_reduce", int(a), int(a + rng.integers(1, 200)), 4, False] for a in t0]
    merged = _merged(calls)
    starts = np.sort(rng.integers(-100, 10_500, 200))
    ends = starts + rng.integers(0, 400, 200)
    brute = [sum(max(0, min(e, b) - max(s, a)) for a, b in merged) for s, e in zip(starts, ends)]
    assert _covered_ns(merged, starts, ends).tolist() == brute
