"""A block freed on a thread that never ran an op while tracking (gloo's worker threads free the
reduce-scatter temporaries their collective allocated on the training thread) is recorded as
freed, not left "alive" for the rest of the run."""
from __future__ import annotations

import queue
import threading

import numpy as np
import torch

import memprof

SIZE = 1 << 22   # 4 MiB: one block, no other allocation of the test has this size


def _dropping_thread():
    """A thread started before tracking that only drops what it is handed: no op, no hook."""
    inbox: queue.Queue = queue.Queue()
    dropped = threading.Event()

    def run():
        while True:
            item = inbox.get()
            if item is None:
                return
            del item            # the last reference dies on this thread
            dropped.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return inbox, dropped, thread


def test_free_on_a_thread_that_never_ran_an_op_is_recorded():
    inbox, dropped, thread = _dropping_thread()
    try:
        with memprof.track() as prof:
            t = torch.empty(SIZE // 4)
            inbox.put(t)
            del t
            assert dropped.wait(10)
    finally:
        inbox.put(None)
        thread.join(10)
    mem = prof.memory
    allocs = np.flatnonzero(mem["size"] == SIZE)
    assert len(allocs) == 1
    ptr = mem["ptr"][allocs[0]]
    frees = np.flatnonzero((mem["size"] == -SIZE) & (mem["ptr"] == ptr))
    assert len(frees) == 1 and frees[0] > allocs[0]
    assert mem["thread"][frees[0]] != mem["thread"][allocs[0]]   # freed on the other thread
    assert prof.live_bytes()[-1] < SIZE


def test_blocks_made_while_tracking_outlive_the_session_and_other_profilers():
    """The watched deleter stays correct after the block leaves (and a later session starts),
    and torch.profiler still sees CPU memory afterwards."""
    with memprof.track():
        kept = torch.ones(1024)
    with memprof.track() as later:
        del kept              # a block of the first session freed in the second
        fresh = torch.zeros(256)
    assert later.untracked_frees >= 1
    assert float(fresh.sum()) == 0.0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as p:
        x = torch.ones(4096)
        y = x * 2
        del y
    assert any(e.cpu_memory_usage > 0 for e in p.events())
    assert torch.equal(x, torch.ones(4096))
