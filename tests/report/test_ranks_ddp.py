"""End to end: a real 2-rank gloo DDP job (torch.multiprocessing.spawn) with the same leak
planted on both ranks; `memprof report job.rank0.memprof job.rank1.memprof` states the leak
once, on ranks 0-1, with each rank's bytes, and both ranks' peaks."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch.multiprocessing as mp

import memprof
from ranks_ddp_job import worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow     # two processes start torch and a process group: ~20-70 s on 2 shared cores
def test_ddp_job_merged_report_states_the_leak_once_with_both_peaks(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path), _free_port()), nprocs=2, join=True)
    paths = [str(tmp_path / f"job.rank{r}.memprof") for r in range(2)]
    profs = [memprof.load(p) for p in paths]
    assert [(p.meta["rank"], p.meta["world_size"], p.meta["dist_backend"]) for p in profs] \
        == [(0, 2, "gloo"), (1, 2, "gloo")]
    env = dict(os.environ, COLUMNS="250")
    run = subprocess.run([sys.executable, "-m", "memprof.cli", "report", *paths, "--json"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["world_size"] == 2 and data["ranks_present"] == [0, 1]
    assert [r["peak_bytes"] for r in data["ranks"]] == [p.peak for p in profs]
    assert data["peak_rank"] == (0 if profs[0].peak > profs[1].peak else 1)
    leaks = [f for f in data["findings"] if f["kind"].startswith("retained")]
    assert len(leaks) == 1, leaks
    assert leaks[0]["on_ranks"] == "on ranks 0-1" and leaks[0]["holder"].endswith("kept_outputs")
    per_rank = {str(r): next(f.bytes for f in p.findings if f.kind.startswith("retained"))
                for r, p in enumerate(profs)}
    assert leaks[0]["bytes_by_rank"] == per_rank
    assert per_rank["1"] == 2 * per_rank["0"]          # rank 1's batches are twice as big
