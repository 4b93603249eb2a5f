"""Rank identity, per-rank file names, the meta's schema and the communication time split:
checked without starting processes (fast)."""
from __future__ import annotations

import pytest
import torch

import memprof
from memprof import profile_schema
from memprof.analyse import communication
from memprof.profile import Profile
from memprof.record.distributed import identity, rank_path

from analyse.runs import RunBuilder


@pytest.fixture
def torchrun_env(monkeypatch):
    for key, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"),
                       ("TORCHELASTIC_RUN_ID", "job-7")):
        monkeypatch.setenv(key, value)


def test_identity_outside_a_job_is_none(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    assert not torch.distributed.is_initialized()
    assert identity() is None


def test_identity_from_torchrun_environment(torchrun_env):
    assert identity() == {"rank": 3, "world_size": 4, "local_rank": 1, "dist_backend": None,
                          "run_id": "job-7"}


@pytest.mark.parametrize("path, rank, expected", [
    ("run.memprof", 0, "run.rank0.memprof"),
    ("out/run.memprof", 12, "out/run.rank12.memprof"),
    ("run.rank3.memprof", 3, "run.rank3.memprof"),
    ("run.rank0.memprof", 1, "run.rank1.memprof"),
    ("run", 2, "run.rank2.memprof"),
])
def test_rank_path(path, rank, expected):
    assert rank_path(path, rank) == expected


def test_track_under_torchrun_env_saves_the_rank_file(torchrun_env, tmp_path, mlp):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    with memprof.track(mlp, opt, path=str(tmp_path / "x.memprof")) as prof:
        mlp(torch.randn(4, 64)).sum().backward()
        opt.step()
    assert prof.saved == str(tmp_path / "x.rank3.memprof")
    meta = memprof.load(prof.saved).meta
    assert {k: meta[k] for k in ("rank", "world_size", "local_rank", "dist_backend",
                                 "run_id")} == identity()


def _header(**meta) -> dict:
    return {"strings": [], "modules": [], "snapshots": [], "meta": meta, "step_seqs": [],
            "records": {}, "findings": [], "sha256": {}}


@pytest.mark.parametrize("meta, problem", [
    ({"rank": 1, "world_size": 2, "local_rank": 1, "dist_backend": "gloo"}, None),
    ({"rank": 0, "world_size": 8, "local_rank": None, "dist_backend": None}, None),
    ({"rank": 2, "world_size": 2}, "meta.rank: expected an int in [0, 2)"),
    ({"rank": "0", "world_size": 2}, "meta.rank: expected int"),
    ({"rank": 0}, "meta: rank and world_size go together"),
    ({"rank": 1, "world_size": 4, "local_rank": 2}, "meta.local_rank: expected an int"),
    ({"rank": 0, "world_size": 2, "dist_backend": 5}, "meta.dist_backend: expected str"),
])
def test_schema_checks_the_rank_fields(meta, problem):
    found = profile_schema.check_header(_header(**meta))
    assert (found is None) if problem is None else found.startswith(problem)


def test_communication_is_the_union_of_calls_in_flight_per_step():
    b = RunBuilder()
    b.mark("step", t_ns=1_000_000)     # the first window starts at t0 (the first event)
    b.mark("step", t_ns=11_000_000)
    b.mark("step", t_ns=21_000_000)
    b.records["communication"] = {"calls": [
        ["all_reduce", 2_000_000, 5_000_000, 64, True],     # step 1: 3 ms ...
        ["all_reduce", 4_000_000, 7_000_000, 64, True],     # ... overlapping: 5 ms in all
        ["broadcast", 10_000_000, 12_000_000, 8, False],    # 1 ms in step 1, 1 ms in step 2
        ["all_reduce", 15_000_000, None, 64, True]]}        # never completed: not counted
    run = b.run()
    run.meta["t0_ns"] = 0
    prof = Profile(run)
    calls = communication.completed_calls(prof)
    assert len(calls) == 3
    assert communication.per_step_ms(prof, calls) == pytest.approx([0.0, 6.0, 1.0])
    assert communication.by_op(calls)["all_reduce"] == {"calls": 2, "bytes": 128,
                                                        "ms": pytest.approx(6.0)}
