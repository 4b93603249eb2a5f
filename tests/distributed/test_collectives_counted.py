"""Collectives and optimizer steps counted once, on a real 2-rank gloo job launched by torchrun
(tests/distributed/collectives_job.py is the job): ZeroRedundancyOptimizer's nested step, its
local optimizer's state, a collective handed back by the update watch's torch function mode or
called by another collective, all-gather bytes whatever the API, compute beside a collective
during the data wait, and prof.export() in each rank."""
from __future__ import annotations

import json
import os

import pytest

import memprof
from torchrun_job import run_job
from memprof.analyse import throughput

WORLD = 2
F32 = 4
pytestmark = pytest.mark.slow   # one torchrun job of 2 ranks: ~20 s on 2 shared cores


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("collectives")
    run_job("collectives_job.py", out, WORLD)
    return out


def load(job, name: str, rank: int) -> memprof.Profile:
    return memprof.load(str(job / f"{name}.rank{rank}.memprof"))


def facts(job, rank: int) -> dict:
    return json.loads((job / f"facts.rank{rank}.json").read_text())


def ops(prof: memprof.Profile) -> list[str]:
    return [c[0] for c in prof.run.records["communication"]["calls"]]


def test_zero_steps_once_per_iteration(job):
    # ZeRO steps its local Adam inside its own step: only the outer step ends one
    for rank in range(WORLD):
        f, prof = facts(job, rank), load(job, "zero", rank)
        assert len(prof.steps) == f["steps"]
        assert len(set(prof.run.records["step_owners"])) == 1      # one optimizer takes turns
        tp = throughput.summarize(prof)
        assert tp["steps"] == f["steps"] and tp["samples_per_s_per"] == "step"
        assert all(ms > 0 for ms in tp["per_step"]["optimizer_ms"])
        # ZeRO broadcasts each parameter from the rank that owns it, once per step; the
        # update watch's torch function mode handed each call back to memprof's wrapper
        assert ops(prof).count("broadcast") == f["params"] * f["steps"]


def test_zero_given_to_track_reports_its_local_optimizers_state(job):
    for rank in range(WORLD):
        held = facts(job, rank)["zero_local_state_bytes"]
        cat = load(job, "zero_given", rank).breakdown("category", at="end")
        assert held > 0 and cat.get("optimizer_state") == held


def test_collectives_handed_back_by_the_update_watch_count_once(job):
    # a loop without an optimizer: the update watch's mode is on from each backward to the
    # next forward, where the gradients' and the loss's all_reduce run
    for rank in range(WORLD):
        f = facts(job, rank)
        assert ops(load(job, "hand", rank)) == ["all_reduce"] * ((f["params"] + 1) * f["steps"])


def test_a_collective_calling_another_counts_once_with_the_whole_buffer(job):
    for rank in range(WORLD):
        f, prof = facts(job, rank), load(job, "direct", rank)
        calls = prof.run.records["communication"]["calls"]
        per_iteration = ["all_gather_into_tensor", "reduce_scatter_tensor", "all_gather"]
        assert [c[0] for c in calls] == per_iteration * f["steps"]
        whole = f["chunk"] * WORLD * F32      # every rank's chunk: the gathered output
        assert {c[0]: c[3] for c in calls} == dict.fromkeys(per_iteration, whole)


def test_compute_is_not_lost_to_a_collective_in_the_data_wait(job):
    # rank 0 waits in the all_reduce before its forward while rank 1 prepares its batch: the
    # collective is in flight during the data wait, subtracted once
    tp = throughput.summarize(load(job, "overlap", 0))
    rows = tp["per_step"]
    measured = range(tp["warmup_steps_excluded"], tp["steps"])
    for i in measured:     # (the forward is neither data wait nor communication)
        assert rows["compute_ms"][i] >= rows["forward_ms"][i] > 0
    assert max(rows["comm_in_data_ms"][i] for i in measured) > 0
    for i in measured:
        union = rows["data_ms"][i] + rows["comm_ms"][i] - rows["comm_in_data_ms"][i]
        assert rows["compute_ms"][i] == pytest.approx(rows["wall_ms"][i] - union, abs=1e-3)
    st = tp["stats"]
    shares = st["compute_ms"]["share"] + st["comm_ms"]["share"] + st["data_ms"]["share"]
    assert shares == pytest.approx(1 + st["comm_in_data_ms"]["share"], abs=1e-3)


def test_data_spans_are_the_throughput_tables_data_wait(job):
    prof = load(job, "overlap", 0)
    data = throughput.summarize(prof)["per_step"]["data_ms"]
    windows = throughput.data_spans(prof)
    assert len(windows) == len(data)
    for ms, win in zip(data[1:], windows[1:]):
        assert sum(b - a for a, b in win) * 1e-6 == pytest.approx(ms, abs=1e-3)


def test_export_in_a_rank_writes_that_ranks_file(job):
    for rank in range(WORLD):
        written = facts(job, rank)["exports"]
        assert [os.path.basename(p) for p in written] == [f"export.rank{rank}.html",
                                                          f"export.rank{rank}.json"]
        trace = json.loads((job / f"export.rank{rank}.json").read_text())
        assert trace["otherData"]["memprof"]["rank"] == rank     # each rank its own file
    assert not (job / "export.html").exists() and not (job / "export.json").exists()
    assert not [n for n in os.listdir(job) if n.endswith(".tmp")]   # written atomically
