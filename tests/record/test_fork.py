"""A child forked while tracking (DataLoader workers with the fork start method, Linux's
default; a bare os.fork()) inherited the session and went on recording into a copy of the log
that nobody reads: a worker making 100 small tensors per item grew from 241 to 359 MB over an
epoch. The child now stops recording at the fork, memprof's hooks come off it, a block it
goes on running ends without a profile (the parent's is the run's), and it can track a block
of its own."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import memprof
from memprof import _C

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")


class _Items(torch.utils.data.Dataset):
    """Each item allocates, then says what the worker's memprof session holds."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        for _ in range(50):
            torch.ones(64) * 2
        return torch.tensor([_C.counters()["records"], int(_C.is_active())])


def _train(model, opt, batches=2):
    for _ in range(batches):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()


def test_dataloader_fork_workers_record_nothing():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(_Items(), batch_size=2, num_workers=2,
                                         multiprocessing_context="fork")
    with memprof.track(model, opt) as prof:
        _train(model, opt)
        seen = torch.cat([b for b in loader])
    assert seen.tolist() == [[0, 0]] * 8   # nothing recorded in the workers, none active
    assert len(prof.steps) - prof.partial_last_step == 2 and prof.peak > 0


def _child(model, opt, tmp_path, prof) -> str:
    """What the child of a fork inside the block checks; '' when all is as expected."""
    if _C.is_active() or _C.counters()["records"] != 0:
        return f"recording in the child: {_C.counters()}"
    if model._forward_pre_hooks or model._forward_hooks:
        return "the parent's module hooks are still on the child's model"
    torch.randn(1000).sum()
    if _C.counters()["records"] != 0:
        return "the child recorded an allocation"
    with memprof.track(model, opt) as own:   # a block of the child's own
        _train(model, opt)
    if len(own.steps) != 2 or own.peak <= 0:
        return f"the child's own block: {len(own.steps)} steps, peak {own.peak}"
    return ""


def test_a_bare_fork_inside_the_block(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "parent.memprof"
    read, write = os.pipe()
    with memprof.track(model, opt, path=str(path)) as prof:
        _train(model, opt)
        pid = os.fork()
        if pid == 0:   # the child: report through the pipe, never return into pytest
            message = "not run"
            try:
                message = _child(model, opt, tmp_path, prof)
            except BaseException as exc:  # noqa: BLE001
                message = f"raised {exc!r}"
            finally:
                os.write(write, (message or "ok").encode())
                os._exit(0)
        _train(model, opt)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 4096).decode() == "ok"
    assert status == 0
    assert len(prof.steps) == 4 and not prof.forked_away
    assert memprof.load(str(path)).peak == prof.peak


def test_the_child_ends_the_block_without_a_profile(tmp_path):
    """A bare fork whose child runs on to the block's end: no profile there, nothing saved
    over the parent's (the parent waits for the child inside its block, so it saves only
    after the child looked: otherwise a slow child found the parent's file)."""
    path = tmp_path / "p.memprof"
    model = torch.nn.Linear(8, 8)
    read, write = os.pipe()
    tracker = memprof.track(model, path=str(path))
    with tracker:
        model(torch.randn(2, 8)).sum().backward()
        pid = os.fork()
        if pid != 0:
            os.waitpid(pid, 0)
    if pid == 0:
        ok = tracker.forked_away and tracker.profile is None and not path.exists()
        os.write(write, b"ok" if ok else b"the child built or saved a profile")
        os._exit(0)
    os.close(write)
    assert os.read(read, 4096) == b"ok"
    assert not tracker.forked_away and memprof.load(str(path)).peak == tracker.profile.peak


def test_memprof_run_of_a_script_that_forks(tmp_path):
    """Like `python script.py`: the child's output, then the parent's, one report, exit 0."""
    script = tmp_path / "forks.py"
    script.write_text(textwrap.dedent("""\
        import os, torch
        model = torch.nn.Linear(8, 8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        pid = os.fork()
        if pid == 0:
            print("child", flush=True)
        else:
            os.waitpid(pid, 0)
            print("parent", flush=True)
    """))
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
    run = subprocess.run([sys.executable, "-m", "memprof.cli", "run", str(script)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert plain.stdout == "child\nparent\n" and plain.returncode == 0
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("child\nparent\n")
    assert run.stdout.count("profile saved to") == 1
    assert "not saved" not in run.stderr
    assert memprof.load(str(tmp_path / "forks.memprof")).peak > 0
