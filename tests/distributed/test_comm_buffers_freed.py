"""FSDP2 on gloo: the reduce-scatter temporaries that the collective allocates on the training
thread are freed by gloo's worker thread, which never runs an op. memprof records those frees,
so communication buffers do not pile up step after step (they did: 14.6 KB alive at the end of
step 0, 71 KB after 12 steps, on rank 0 of this job)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import memprof
from memprof.record.events import CAT_COMMUNICATION

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from fsdp_comm_job import STEPS  # noqa: E402

pytestmark = pytest.mark.slow   # one torchrun job of 2 ranks: ~20 s on 2 shared cores


def _run_job(out_dir) -> bool:
    """One 2-rank job, checked; True when some communication buffer was freed on another
    thread than the one that allocated it (whether gloo's worker or the training thread drops
    the last reference is a race: on a loaded machine the training thread can win every time)."""
    out_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         os.path.join(HERE, "fsdp_comm_job.py"), str(out_dir)],
        capture_output=True, text=True, timeout=240, cwd=out_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    crossed = False
    for rank in range(2):
        prof = memprof.load(str(out_dir / f"fsdp.rank{rank}.memprof"))
        steps = prof.steps
        assert len(steps) == STEPS
        comm = prof.category == CAT_COMMUNICATION
        size = prof.memory["size"]
        last = steps[-1]
        made_in_last_step = int(size[last.start:last.end][comm[last.start:last.end]]
                                .clip(min=0).sum())
        assert made_in_last_step > 0      # the job does run collectives every step
        alive = prof.breakdown("category", at=len(steps) - 1)["communication"]
        # at most what the last step itself allocated is still in flight at its end
        assert alive <= made_in_last_step, (rank, alive, made_in_last_step)
        thread, alloc_of = prof.memory["thread"], prof.alloc_of
        frees = np.flatnonzero((size < 0) & (alloc_of >= 0))
        comm_frees = frees[comm[alloc_of[frees]]]
        crossed |= bool(np.any(thread[comm_frees] != thread[alloc_of[comm_frees]]))
    return crossed


def test_communication_buffers_freed_on_gloo_threads_do_not_pile_up(tmp_path):
    # every job must not pile up; at least one of up to three must show a free on another
    # thread being recorded (in a fresh-clone CI run under load, one job showed none)
    assert any(_run_job(tmp_path / f"job{i}") for i in range(3))
