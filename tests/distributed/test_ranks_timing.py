"""The merged report of a job's rank files says how long each rank's steps take, which rank is
the straggler and which wait for it, and which rank failed first: a real 2-rank gloo job run by
`memprof run --nproc-per-node 2`, in which rank 1 does more work per step and then raises."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import memprof
from memprof.analyse import throughput
from memprof.analyse.ranks import merge_ranks

pytestmark = pytest.mark.slow   # one job of 2 ranks under memprof run: ~20 s on 2 shared cores

STEPS = 6
SCRIPT = textwrap.dedent(f"""
    import time
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range({STEPS} + 1):
        if rank == 1 and step == {STEPS}:
            raise RuntimeError("rank 1 gave up")     # rank 0 fails in its next collective
        loss = model(torch.randn(8, 32)).square().mean()
        if rank == 1:
            time.sleep(0.05)                         # rank 1's own work: 50 ms more a step
        loss.backward()
        opt.step()
        opt.zero_grad()
""")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("straggler")
    (out / "train.py").write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--nproc-per-node", "2",
                           "-o", "job.memprof", "train.py"],
                          capture_output=True, text=True, timeout=240, cwd=out)
    assert proc.returncode != 0 and "rank 1 failed first" in proc.stderr, proc.stderr[-3000:]
    paths = [str(out / f"job.rank{r}.memprof") for r in range(2)]
    return out, paths, [memprof.load(p) for p in paths]


def report(out, *args) -> str:
    proc = subprocess.run([sys.executable, "-m", "memprof.cli", "report", *args,
                           "job.rank0.memprof", "job.rank1.memprof"], capture_output=True,
                          text=True, timeout=120, cwd=out,
                          env={**os.environ, "COLUMNS": "200"})   # no wrapped table cells
    return proc.stdout


def test_each_ranks_timing_is_its_own_throughput_summary(job):
    _, paths, profs = job
    merged = merge_ranks(profs, paths)
    for row, prof in zip(merged.ranks, profs):
        tp = throughput.summarize(prof)
        assert row.timing["step_ms"] == tp["stats"]["wall_ms"]["median"]
        assert row.timing["comm_share"] == tp["stats"]["comm_ms"]["share"]
        assert row.timing["samples_per_s"] == tp["samples_per_s_overall"] > 0
        assert row.timing["steps_measured"] == tp["steps_measured"] > 0


def test_the_slow_rank_is_named_and_the_rank_that_waits(job):
    out, paths, profs = job
    merged = merge_ranks(profs, paths)
    t0, t1 = (r.timing for r in merged.ranks)
    assert t0["comm_share"] > t1["comm_share"]        # rank 0 waits in the all-reduce
    assert t1["own_work_ms"] > t0["own_work_ms"]
    st = merged.stragglers
    assert (st["slowest_rank"], st["straggler"], st["waiting_ranks"]) == (1, True, [0])
    data = json.loads(report(out, "--json"))
    assert data["stragglers"]["slowest_rank"] == 1 and data["stragglers"]["waiting_ranks"] == [0]
    assert [r["timing"]["step_ms"] for r in data["ranks"]] == [t0["step_ms"], t1["step_ms"]]
    text = report(out)
    assert "slowest rank 1:" in text and "waiting for it: rank 0" in text
    assert "Per rank: time per step" in text


def test_the_rank_that_failed_first_is_marked(job):
    out, paths, profs = job
    assert profs[1].meta["error"] == "RuntimeError: rank 1 gave up"
    assert profs[0].meta.get("error")                 # the peer's failure, or SIGTERM
    merged = merge_ranks(profs, paths)
    assert merged.first_failure["rank"] == 1
    if "error_unix_s" in profs[0].meta:
        assert profs[1].meta["error_unix_s"] < profs[0].meta["error_unix_s"]
    assert json.loads(report(out, "--json"))["first_failure"]["rank"] == 1
    lines = report(out).splitlines()
    raised = [i for i, line in enumerate(lines) if "tracked code raised" in line]
    assert "rank 1's tracked code raised" in lines[raised[0]]   # the cause listed first
    assert "(failed first)" in "".join(lines[raised[0]:raised[1]])
    assert any("first to fail: rank 1" in line for line in lines)
