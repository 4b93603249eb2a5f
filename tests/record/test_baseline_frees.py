"""Blocks that existed before tracking (parameters, buffers, optimizer state) and are freed
inside the block: the CPU allocator frees them without a report (it notes sizes only while
someone profiles), so memprof watches their frees itself. Without it the profile kept them
"alive" to the end, and a new block at a freed one's address read as two live blocks at once."""
import gc
import queue
import threading

import numpy as np
import torch

import memprof
from memprof import _C
from memprof.record.events import PREEXISTING_THREAD


def _steps(model, opt, n):
    for _ in range(n):
        x = torch.randn(8, 4, dtype=next(model.parameters()).dtype)
        model(x).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _baseline_row(prof, ptr: int) -> int:
    mem = prof.memory
    rows = np.flatnonzero((mem["thread"] == PREEXISTING_THREAD) & (mem["ptr"] == ptr))
    assert len(rows) == 1, rows
    return int(rows[0])


def _frees_at(prof, ptr: int) -> np.ndarray:
    mem = prof.memory
    return np.flatnonzero((mem["ptr"] == ptr) & (mem["size"] < 0))


def test_blocks_from_before_tracking_freed_inside_are_freed_in_the_profile():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _steps(model, opt, 1)
    old = {name: t.untyped_storage().data_ptr()
           for name, t in [*model.named_parameters(), *model.named_buffers()] if t.numel() > 1}
    with memprof.track(model, opt) as prof:
        _steps(model, opt, 2)
        model.double()              # every float32 parameter and buffer is freed here
        _steps(model, opt, 2)
    for name, ptr in old.items():
        row = _baseline_row(prof, ptr)
        free = int(prof.free_of[row])
        assert free > row, name     # freed, by a free event of its own
        assert prof.memory["size"][free] == -prof.memory["size"][row], name
    # no address holds two live blocks at the end, and the old blocks are gone from it
    alive = prof.alive_at("end")
    ptrs = prof.memory["ptr"][alive]
    assert len(np.unique(ptrs)) == len(ptrs)
    assert not np.isin(alive, [_baseline_row(prof, p) for p in old.values()]).any()
    # every free at those addresses releases a block the profile knows
    for ptr in old.values():
        assert (prof.alloc_of[_frees_at(prof, ptr)] >= 0).all()


def test_a_block_made_under_torch_profiler_is_freed_once():
    """A block made while torch.profiler recorded memory: the CPU allocator knows its size and
    reports its free too; the profile still has one free for it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True):
        model = torch.nn.Linear(64, 64)
    ptr = model.weight.untyped_storage().data_ptr()
    with memprof.track(model) as prof:
        model(torch.randn(2, 64))
        model.weight = torch.nn.Parameter(torch.randn(64, 64))   # the old weight is freed
        model(torch.randn(2, 64))
    frees = _frees_at(prof, ptr)
    assert len(frees) >= 1
    row = _baseline_row(prof, ptr)
    assert int(prof.free_of[row]) == int(frees[0])
    # any further free at that address releases a block allocated inside, not the old weight
    assert (prof.alloc_of[frees[1:]] > row).all()


def test_a_baseline_block_freed_under_a_later_torch_profiler_is_reported_to_it():
    """A parameter made under torch.profiler (the CPU allocator noted its size), watched as a
    session's baseline, then freed while torch.profiler records memory again: torch.profiler
    sees its free, as it did before memprof looked (the free went around the allocator's own
    deleter, which reports it, when the session had taken its blocks from alloc_cpu)."""
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, profile_memory=True):
        model = torch.nn.Linear(617, 500, bias=False)
    nbytes = 617 * 500 * 4
    with memprof.track(model):
        model(torch.randn(2, 617)).sum().backward()
    with torch.profiler.profile(activities=cpu, profile_memory=True) as later:
        del model
        gc.collect()
    frees = [e for e in later.events()
             if e.name == "[memory]" and e.cpu_memory_usage == -nbytes]
    assert len(frees) == 1, frees


def test_a_baseline_block_freed_on_a_thread_that_never_ran_an_op():
    model = torch.nn.Linear(256, 256)
    ptr = model.weight.untyped_storage().data_ptr()
    inbox: queue.Queue = queue.Queue()
    handed_over = threading.Event()
    done = threading.Event()

    def drop():
        item = inbox.get()
        handed_over.wait(10)   # the main thread has let go: the last reference is this one
        del item
        done.set()

    thread = threading.Thread(target=drop, daemon=True)
    thread.start()
    with memprof.track(model) as prof:
        model(torch.randn(2, 256))
        weight = model.weight
        model.weight = torch.nn.Parameter(torch.zeros(256, 256))
        inbox.put(weight)
        del weight
        handed_over.set()
        assert done.wait(10)
        model(torch.randn(2, 256))
    thread.join(10)
    row = _baseline_row(prof, ptr)
    free = int(prof.free_of[row])
    assert free > row
    mem = prof.memory
    main_thread = mem["thread"][(mem["size"] > 0) & (mem["thread"] != PREEXISTING_THREAD)][0]
    assert mem["thread"][free] != main_thread    # recorded on the thread that freed it


def test_watched_blocks_outlive_the_block_and_are_watched_again():
    model = torch.nn.Linear(32, 32)
    with memprof.track(model):
        model(torch.randn(2, 32))
    # watched by the first block and still alive: a second one watches them again; a third
    # tensor of the allocator's is watched anew, an empty one (no block) not at all
    extra = torch.randn(1000)
    assert _C.watch_baseline_frees([model.weight, model.bias, extra, torch.empty(0)]) == 3
    ptr = model.weight.untyped_storage().data_ptr()
    with memprof.track(model) as prof:
        model.weight = torch.nn.Parameter(torch.zeros(32, 32))
    assert prof.free_of[_baseline_row(prof, ptr)] >= 0


def _exit_status(pid: int, timeout: float) -> int:
    """The child's exit status; a child still running after `timeout` (hung) is killed."""
    import os
    import signal
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"forked child {pid} hung")


def test_a_forked_child_frees_watched_blocks():
    """The watch's lock is held around a fork: a child freeing a watched block (a DataLoader
    worker dropping its copy of the model) frees it with the allocator's own deleter."""
    import os

    model = torch.nn.Linear(64, 64)
    with memprof.track(model):
        model(torch.randn(2, 64))
    stop = threading.Event()

    def churn():   # another thread watching and freeing blocks while the fork happens
        while not stop.is_set():   # (torch.empty: randn's generator lock is not fork-safe)
            t = torch.empty(256)
            _C.watch_baseline_frees([t])
            t.resize_(1 << 16)     # the watched block freed inside the op, without the GIL

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for _ in range(5):
            pid = os.fork()
            if pid == 0:   # the child: drop the watched weight, then a fresh block
                status = 1
                try:
                    model.weight = torch.nn.Parameter(torch.zeros(64, 64))
                    t = torch.empty(256)
                    _C.watch_baseline_frees([t])
                    del t
                    status = 0
                finally:
                    os._exit(status)
            assert _exit_status(pid, timeout=30) == 0
    finally:
        stop.set()
        thread.join(10)
