"""parameters_without_gradients and gradients_not_trained in real 2-rank gloo jobs
(tests/distributed/gradless_job.py): a layer the forward never calls is named once, on the
ranks that hold it, with the bytes each rank holds; DDP's no_sync() accumulation says
nothing. ZeroRedundancyOptimizer's local optimizers hold the state of one shard each (its
outer optimizer holds none: the layer was not judged at all), and FSDP2's DTensor parameters
were counted at their full size on every rank."""
from __future__ import annotations

import os
import sys

import pytest

import memprof
from memprof.analyse.ranks import merge_ranks
from torchrun_job import run_job

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gradless_job import SPARE, STEPS  # noqa: E402

WORLD = 2
F32 = 4
KINDS = ("parameters_without_gradients", "gradients_not_trained")
SPARE_BYTES = (SPARE[0] * SPARE[1] + SPARE[1]) * F32


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("gradless")
    run_job("gradless_job.py", out, WORLD)
    return out


def profiles(job, name: str) -> list[memprof.Profile]:
    return [memprof.load(str(job / f"{name}.rank{r}.memprof")) for r in range(WORLD)]


def gradless(prof) -> list:
    return [f for f in memprof.findings(prof, "info") if f.kind in KINDS]


def test_no_sync_accumulation_says_nothing(job):
    for prof in profiles(job, "accum"):
        assert len(prof.steps) == STEPS and not gradless(prof)


def test_zero_names_the_unused_layer_on_the_rank_whose_shard_holds_it(job):
    named, total = set(), 0
    for rank, prof in enumerate(profiles(job, "zero")):
        held = set((job / f"zero.rank{rank}.held").read_text().split())
        found = gradless(prof)
        spare_here = {n for n in held if n.startswith("module.spare.")}
        if not spare_here:
            assert not found, found[0].message
            continue
        assert len(found) == 1 and found[0].kind == "parameters_without_gradients"
        f = found[0]
        assert set(f.evidence["names"]) == spare_here   # its own shard's, never another's
        named |= spare_here
        total += f.bytes
    assert named == {"module.spare.weight", "module.spare.bias"}
    assert total == SPARE_BYTES


def test_fsdp2_states_each_ranks_shard_once_in_the_merged_report(job):
    profs = profiles(job, "fsdp")
    for prof in profs:
        (f,) = gradless(prof)
        assert f.kind == "parameters_without_gradients"
        assert f.bytes == SPARE_BYTES // WORLD, f.message   # the local shard's rows
        assert "spare.weight, spare.bias" in f.message
    merged = merge_ranks(profs)
    (f,) = [g for g in merged.findings if g.kind in KINDS]
    assert f.bytes_by_rank == {r: SPARE_BYTES // WORLD for r in range(WORLD)}
