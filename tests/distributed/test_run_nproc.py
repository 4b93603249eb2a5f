"""`memprof run --nproc-per-node N script.py`: an unmodified DDP script run as 2 gloo ranks by
torch.distributed's launcher, each rank under `memprof.cli run` (the `torchrun -m memprof.cli
run` form, started for the user)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import memprof

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(int(sys.argv[1])):
        model(torch.randn(8, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    if int(sys.argv[2]) < 0:
        dist.destroy_process_group()
    elif dist.get_rank() == int(sys.argv[2]):   # the other ranks end without a collective
        raise SystemExit(3)
""")


def memprof_run(tmp_path, *args):
    (tmp_path / "train.py").write_text(SCRIPT)
    return subprocess.run([sys.executable, "-m", "memprof.cli", "run", *args],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)


@pytest.mark.slow
def test_each_rank_saves_its_profile_and_rank_0_reports(tmp_path):
    proc = memprof_run(tmp_path, "--nproc-per-node", "2", "-o", "job.memprof",
                       "--budget", "v100-16gb", "train.py", "3", "-1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memprof: rank 1 peak" in proc.stdout
    assert "merge the ranks: memprof report job.rank*.memprof" in proc.stdout
    assert "communication (in flight)" in proc.stdout       # rank 0's throughput table
    for rank in range(2):
        prof = memprof.load(str(tmp_path / f"job.rank{rank}.memprof"))
        assert (prof.meta["rank"], prof.meta["world_size"], prof.meta["dist_backend"]) == \
            (rank, 2, "gloo")
        assert len(prof.steps) == 3
        assert prof.meta["budget"]    # --budget reached every rank's command line
        assert prof.breakdown("category", at="end")["communication"] > 0   # DDP's bucket


@pytest.mark.slow
def test_a_failing_rank_is_named_and_its_profile_kept(tmp_path):
    proc = memprof_run(tmp_path, "--nproc-per-node", "2", "train.py", "2", "1")
    assert proc.returncode == 1
    assert "memprof run: rank 1 failed first (exit 3)" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "train.rank1.memprof").exists()


def test_nproc_per_node_must_be_positive(tmp_path):
    proc = memprof_run(tmp_path, "--nproc-per-node", "0", "train.py", "1", "-1")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("memprof: --nproc-per-node 0: expected a positive number "
                                   "of processes")


HOOK_LATE = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(64, 64))
    with torch.no_grad():
        model(torch.randn(2, 64))                       # a sanity forward first
    calls = []

    def counted_fp16(state, bucket):
        calls.append(bucket.buffer().numel())
        return default_hooks.fp16_compress_hook(state, bucket)
    model.register_comm_hook(None, counted_fp16)         # then the user's comm hook
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert len(calls) == 3, calls
    sys.stdout.write(f"hook calls {len(calls)}\\n")   # one write: the two ranks share the pipe
    sys.stdout.flush()   # (print's pieces, unbuffered, interleaved: "hook callshook calls  33")
    dist.destroy_process_group()
""")

SAVES_ITSELF = textwrap.dedent("""
    import torch
    import torch.distributed as dist
    import memprof
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    model = DDP(torch.nn.Linear(16, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, optimizer=opt) as prof:
        for _ in range(2):
            model(torch.randn(4, 16)).sum().backward()
            opt.step()
            opt.zero_grad()
    print("saved", prof.save("api.memprof"), flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_a_comm_hook_registered_after_the_first_forward_is_the_one_that_runs(tmp_path):
    """memprof's own DDP comm hook (registered at the first tracked forward, to time the
    bucket all-reduce) made a user's later `register_comm_hook` fail ("can only be called
    once"); now the user's hook runs in its place, every bucket."""
    (tmp_path / "hook.py").write_text(HOOK_LATE)
    proc = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--nproc-per-node", "2",
                           "-o", "job.memprof", "hook.py"], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hook calls 3" in proc.stdout
    for rank in range(2):
        comm = memprof.load(str(tmp_path / f"job.rank{rank}.memprof")).run.records[
            "communication"]
        assert comm["ddp_hooks_registered"] == 1
        assert sum(c[0] == "all_reduce" for c in comm["calls"]) >= 3   # the fp16 buckets


@pytest.mark.slow
def test_prof_save_under_torchrun_keeps_every_ranks_file(tmp_path):
    """`prof.save("api.memprof")` (the README's first example) in a torchrun job: every rank
    wrote the same file, and the last one kept it."""
    (tmp_path / "api.py").write_text(SAVES_ITSELF)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "api.py"], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        prof = memprof.load(str(tmp_path / f"api.rank{rank}.memprof"))
        assert prof.meta["rank"] == rank and prof.meta["world_size"] == 2
    assert not (tmp_path / "api.memprof").exists()
