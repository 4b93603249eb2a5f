"""The event log's 2 MiB chunks are faulted in by a worker thread ahead of the thread that
writes them (csrc/chunk_pool.cpp): the kernel zeroes (and a VM's host backs) a fresh chunk
there, not inside the allocation that filled the last one. The worker starts with a session's
second chunk (a short block pays nothing). Checked on real recordings: which chunks the writer
took ready, that the events in them are whole, that the worker is gone when the session stops,
and that a child forked while it runs records with a pool of its own."""
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from memprof import _C
from memprof.record.events import EVENT_DTYPE

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="Linux /proc only")

#: events per chunk: (2 MiB - 64) / 72-byte events
CHUNK_EVENTS = ((2 << 20) - 64) // 72


def _threads() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def _threads_settle_at(count: int) -> bool:
    """Whether the process's thread count comes back to `count` (a joined thread may stay
    listed in /proc a moment)."""
    deadline = time.monotonic() + 5
    while _threads() != count and time.monotonic() < deadline:
        time.sleep(0.01)
    return _threads() == count


def _thread_ids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _blocked_signals(tids: set[int]) -> list[int]:
    """The blocked-signal masks of those threads still there."""
    masks = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/status", encoding="ascii") as f:
                masks += [int(line.split()[1], 16) for line in f if line.startswith("SigBlk:")]
        except FileNotFoundError:   # a short-lived thread of torch's, gone
            pass
    return masks


def _fill_chunks(n: int, pause_s: float) -> None:
    """About n chunks of events (alloc + free of a small tensor each), pausing after each:
    the worker has time to fault the next one in, however loaded the machine."""
    for _ in range(n):
        for _ in range(CHUNK_EVENTS // 2 + 1):
            torch.empty(16)
        time.sleep(pause_s)


def _take_memory_events() -> np.ndarray:
    memory, _side, _positions, _device = _C.take_events([])
    return memory.view(EVENT_DTYPE)


def test_the_writer_takes_chunks_the_worker_faulted_in():
    before, tids = _threads(), _thread_ids()
    _C.start(1 << 24)
    try:
        _fill_chunks(5, pause_s=0.2)
        during = _threads()
        worker_masks = _blocked_signals(_thread_ids() - tids)
        counts = _C.counters()
    finally:
        _C.stop()
    memory = _take_memory_events()
    # the first two chunks are the writer's own (the second starts the worker); the next
    # ones were ready
    assert counts["chunks_mapped"] == 2 and counts["chunks_ready"] >= 3, counts
    chunks = counts["chunks_mapped"] + counts["chunks_ready"]
    assert (chunks - 1) * CHUNK_EVENTS < counts["records"] <= chunks * CHUNK_EVENTS
    # the events written into worker-made chunks are whole: every allocation of the loop, of
    # 64 bytes, each freed by the next event
    sizes = memory["size"]
    loop = np.flatnonzero(np.abs(sizes) == 64)
    assert loop.size >= 5 * CHUNK_EVENTS
    allocs = sizes[loop] > 0
    assert allocs.sum() == (~allocs).sum()
    assert during == before + 1          # the worker, while recording
    # it blocks Ctrl-C and SIGTERM: they reach the threads that run Python, as without it
    assert len(worker_masks) == 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        assert worker_masks[0] >> (sig - 1) & 1, (sig, hex(worker_masks[0]))
    assert _threads_settle_at(before)    # joined at stop


def test_a_second_session_starts_its_own_worker_and_counts_afresh():
    for _ in range(2):
        _C.start(1 << 24)
        try:
            _fill_chunks(3, pause_s=0.2)
            counts = _C.counters()
        finally:
            _C.stop()
        _take_memory_events()
        assert counts["chunks_mapped"] == 2 and counts["chunks_ready"] in (1, 2), counts


def test_a_short_block_takes_one_huge_chunk_and_starts_no_worker():
    before = _threads()
    _C.start(1 << 20)
    try:
        for _ in range(CHUNK_EVENTS // 4):   # half the starting thread's first chunk
            torch.empty(16)
        time.sleep(0.2)
        during = _threads()
        other = threading.Thread(target=lambda: torch.empty(16))
        other.start()
        other.join()
        counts = _C.counters()
    finally:
        _C.stop()
    _take_memory_events()
    # the other thread's first chunk takes small pages, not the pool's
    assert counts["threads"] == 2, counts
    assert counts["chunks_mapped"] == 1 and counts["chunks_ready"] == 0, counts
    assert during == before and _threads_settle_at(before)   # no worker


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_a_child_forked_while_the_worker_runs_records_with_a_pool_of_its_own():
    _C.start(1 << 24)
    try:
        _fill_chunks(3, pause_s=0.2)    # the worker runs, two chunks ready
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:   # the child: not recording; a session of its own, chunks and all
            code, said = 1, "0 the child failed"
            try:
                os.close(read_end)
                _C.release_after_fork()
                _C.start(1 << 24)
                _fill_chunks(5, pause_s=0.2)
                counts = _C.counters()
                _C.stop()
                memory = _take_memory_events()
                # chunks 3-5 from a worker of the child's own (the parent's is not there,
                # and its two ready chunks are not the child's to take)
                ok = (counts["chunks_ready"] >= 3 and
                      int((memory["size"] == 64).sum()) >= 5 * CHUNK_EVENTS // 2)
                said, code = f"{int(ok)} {counts}", 0
            except BaseException as err:  # noqa: BLE001  (said to the parent)
                said = f"0 {type(err).__name__}: {err}"
            finally:
                os.write(write_end, said.encode())
                os._exit(code)
        os.close(write_end)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read_end, "rb") as f:
            said = f.read().decode()
        _fill_chunks(1, pause_s=0.0)    # the parent's worker goes on
        counts = _C.counters()
    finally:
        _C.stop()
    _take_memory_events()
    assert os.waitstatus_to_exitcode(status) == 0 and said.startswith("1 "), said
    assert counts["chunks_ready"] >= 1, counts
