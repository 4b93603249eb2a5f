"""Run independent plan jobs in forked worker processes, one per core.

A fake-tensor step is pure Python on one core, and the precision x checkpointing combinations
of a plan do not depend on each other, so `recommend` spreads them over the cores. Workers are
forked (not spawned): they inherit the imported torch, the built model and its fake copy for
free, and only a job's argument goes to a worker; its result comes back pickled. Where fork is
not available, or one core is, jobs run in this process, in order.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

__all__ = ["default_workers", "usable_cores", "Pool", "WorkerDied"]

#: the job function of the pool being created; workers inherit it through fork
_JOB: Callable[[Any], Any] | None = None


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover  (not Linux)
        return os.cpu_count() or 1


def default_workers() -> int:
    """The usable cores; 1 in a process that holds a CUDA context or a process group (a
    training job asking what fits): a forked copy of those is not safe to use."""
    import torch
    if torch.cuda.is_initialized():
        return 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return 1
    return usable_cores()


def _run(arg):
    import torch
    torch.set_num_threads(1)   # a worker is one core: no intra-op threads fighting the others
    return _JOB(arg)


class Pool:
    """`submit(arg)` then `results()`: job(arg) for each, in worker processes when
    `workers` > 1 (fork), else here. `results()` yields (arg, result) as jobs finish and may
    be given more jobs meanwhile (`submit` inside the loop). A worker that dies (a crash in
    native code) raises `WorkerDied` for its job."""

    def __init__(self, job: Callable[[Any], Any], workers: int):
        self.job = job
        self.workers = max(1, int(workers))
        self._queue: list = []
        self._running: dict = {}
        self._executor = None
        if self.workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            global _JOB
            _JOB = job
            self._executor = ProcessPoolExecutor(self.workers,
                                                 mp_context=multiprocessing.get_context("fork"))

    def submit(self, arg) -> None:
        if self._executor is None:
            self._queue.append(arg)
        else:
            self._running[self._executor.submit(_run, arg)] = arg

    def results(self):
        try:
            while self._queue or self._running:
                if self._executor is None:
                    arg = self._queue.pop(0)
                    yield arg, self.job(arg)
                    continue
                done, _ = wait(list(self._running), return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: list(self._running).index(f)):
                    arg = self._running.pop(fut)
                    try:
                        yield arg, fut.result()
                    except BrokenProcessPool:
                        raise WorkerDied("a worker process of the plan died (a crash in native "
                                         "code); run with workers=1 to see it") from None
        finally:
            self.close()

    def close(self) -> None:
        global _JOB
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        _JOB = None


class WorkerDied(RuntimeError):
    """A worker process ended without returning its job's result."""
