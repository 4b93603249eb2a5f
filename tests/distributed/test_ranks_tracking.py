"""Real 2-rank gloo jobs on this CPU, launched by torchrun: each rank's profile, its meta, the
exact per-rank model-state bytes under DDP and FSDP2, a planted leak seen on both ranks, the
communication buffers and the collectives' time (tests/distributed/ranks_job.py is the job)."""
from __future__ import annotations

import math
import os
import sys

import pytest

import memprof
from torchrun_job import run_job
from memprof.analyse import throughput

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from ranks_job import LAYERS, STEPS  # noqa: E402

WORLD = 2
F32 = 4
pytestmark = pytest.mark.slow   # one torchrun job of 2 ranks: ~20-30 s on 2 shared cores


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    run_job("ranks_job.py", out, WORLD)
    return out


def load(job, name: str, rank: int) -> memprof.Profile:
    return memprof.load(str(job / f"{name}.rank{rank}.memprof"))


def shapes() -> list[tuple[int, ...]]:
    """(rows, cols) of each weight and (rows,) of each bias, as nn.Linear makes them."""
    out = []
    for n_in, n_out in LAYERS:
        out += [(n_out, n_in), (n_out,)]
    return out


def numel(shape) -> int:
    return math.prod(shape)


def test_one_file_per_rank_with_its_identity(job):
    names = sorted(os.listdir(job))
    assert names == sorted(f"{n}.rank{r}.memprof" for n in ("ddp", "ddp_leak", "fsdp")
                           for r in range(WORLD))
    run_ids = set()
    for rank in range(WORLD):
        meta = load(job, "ddp", rank).meta
        assert (meta["rank"], meta["world_size"], meta["local_rank"], meta["dist_backend"]) \
            == (rank, WORLD, rank, "gloo")
        run_ids.add(meta["run_id"])
    assert len(run_ids) == 1   # torchrun's id of the job: the same in every rank's file


def test_ddp_model_state_per_rank_is_the_full_model(job):
    params = sum(numel(s) for s in shapes()) * F32
    adam = 2 * params + len(shapes()) * F32          # exp_avg, exp_avg_sq, a 0-d step each
    for rank in range(WORLD):
        cat = load(job, "ddp", rank).breakdown("category", at="end")
        assert cat["parameters"] == params
        assert cat["gradients"] == params
        assert cat["optimizer_state"] == adam
        # DDP's gradient bucket: every gradient once more, flat (gradient_as_bucket_view off)
        assert cat["communication"] == params


def test_fsdp2_shards_are_one_world_th_plus_padding(job):
    # FSDP2 shards dim 0: each rank stores ceil(rows / world) rows (the last rank's shard is
    # padded); Adam's state has the shape of the unpadded local shard
    padded = sum(math.ceil(s[0] / WORLD) * numel(s[1:]) for s in shapes()) * F32
    for rank in range(WORLD):
        local = 0
        for s in shapes():
            rows = math.ceil(s[0] / WORLD)
            local += max(0, min(rows, s[0] - rank * rows)) * numel(s[1:])
        prof = load(job, "fsdp", rank)
        cat = prof.breakdown("category", at="end")
        assert cat["parameters"] == padded
        assert cat["gradients"] == padded
        assert cat["optimizer_state"] == 2 * local * F32 + len(shapes()) * F32
        full_first_layer = (numel(shapes()[0]) + numel(shapes()[1])) * F32
        # at the peak the first layer is all-gathered: its full parameters are communication
        assert prof.breakdown("category")["communication"] >= full_first_layer
    # 7 rows over 2 ranks: 4 + 3, so the ranks' optimizer states differ while parameters match
    states = {load(job, "fsdp", r).breakdown("category", at="end")["optimizer_state"]
              for r in range(WORLD)}
    assert len(states) == WORLD


def test_planted_leak_is_found_on_every_rank(job):
    for rank in range(WORLD):
        leaks = [f for f in load(job, "ddp_leak", rank).findings
                 if f.kind == "retained_graph"]
        assert leaks and "history" in (leaks[0].holder or ""), rank
        assert not [f for f in load(job, "ddp", rank).findings if f.kind == "retained_graph"]


def test_collectives_are_timed_and_split_the_step(job):
    for name, ops in (("ddp", {"all_reduce"}),
                      ("fsdp", {"all_gather_single", "reduce_scatter_single"})):
        for rank in range(WORLD):
            tp = throughput.summarize(load(job, name, rank))
            comm = tp["communication"]
            assert ops <= set(comm["by_op"]), (name, comm["by_op"])
            assert comm["incomplete_calls"] == 0
            assert all(row["ms"] > 0 for row in comm["by_op"].values())
            if name == "ddp":   # one bucket: one all-reduce per step
                assert comm["by_op"]["all_reduce"]["calls"] == STEPS
            per_step = tp["per_step"]
            assert len(per_step["comm_ms"]) == STEPS and all(c > 0 for c in per_step["comm_ms"])
            for wall, comm_ms, compute, data, both in zip(
                    per_step["wall_ms"], per_step["comm_ms"], per_step["compute_ms"],
                    per_step["data_ms"], per_step["comm_in_data_ms"]):
                assert comm_ms <= wall + 1e-3
                # (a collective in flight during the data wait is subtracted once)
                assert compute == pytest.approx(
                    max(0.0, wall - (data or 0) - comm_ms + both), abs=1e-3)
