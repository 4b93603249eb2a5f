"""Run independent plan jobs in forked worker processes, one per core.

A fake-tensor step is pure Python on one core, and the precision x checkpointing combinations
of a plan do not depend on each other, so `recommend` spreads them over the cores. Workers are
forked (not spawned): they inherit the imported torch, the built model and its fake copy for
free, and only a job's argument goes to a worker; its result comes back pickled. Where fork is
not available, or one core is, jobs run in this process, in order.

Each worker keeps what its jobs leave behind (the fake-op caches of `memprof.plan.estimate`,
keyed on shapes), so a job goes, when it can, to the worker that last ran a job of the same
affinity (the micro-batch: estimates of one batch size share most of their ops); a free
worker with nothing of its own takes an affinity no other worker has, else any job.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable

__all__ = ["default_workers", "usable_cores", "Pool", "WorkerDied"]

_NOTHING_YET = object()   # a worker's affinity before its first job

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


def _worker_loop(conn, job) -> None:
    """A forked worker: run each job received, send back ("ok", result) or ("error",
    exception); None ends it."""
    import torch
    torch.set_num_threads(1)   # a worker is one core: no intra-op threads fighting the others
    while True:
        try:
            arg = conn.recv()
        except (EOFError, KeyboardInterrupt):
            break
        if arg is None:
            break
        try:
            reply = ("ok", job(arg))
        except BaseException as e:  # noqa: BLE001  (every failure goes back to the parent)
            reply = ("error", e)
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            # a result or an exception that does not pickle: its text goes back instead
            text = "".join(traceback.format_exception_only(type(reply[1]), reply[1])).strip()
            conn.send(("error", RuntimeError(f"{text} (could not be sent back: {e})")))
        except (BrokenPipeError, KeyboardInterrupt):
            break
    conn.close()


class Pool:
    """`submit(arg)` then `results()`: job(arg) for each, in forked worker processes when
    `workers` > 1, else here in order. `results()` yields (arg, result) as jobs finish and may
    be given more jobs meanwhile (`submit` inside the loop); a job's exception is raised
    there. `affinity(arg)` (default: none) keys the worker a job prefers (see the module
    docstring). A worker that dies (a crash in native code) raises `WorkerDied` for its job."""

    def __init__(self, job: Callable[[Any], Any], workers: int,
                 affinity: Callable[[Any], Any] | None = None):
        self.job = job
        self.workers = max(1, int(workers))
        self.affinity = affinity or (lambda arg: None)
        self._pending: list = []
        self._running: dict = {}    # worker index -> its job's arg
        self._conns: list = []
        self._procs: list = []
        self._last: list = []       # affinity of each worker's last job
        if self.workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("fork")
            for _ in range(self.workers):
                here, there = ctx.Pipe()
                proc = ctx.Process(target=_worker_loop, args=(there, job), daemon=True)
                proc.start()
                there.close()
                self._conns.append(here)
                self._procs.append(proc)
                self._last.append(_NOTHING_YET)

    def submit(self, arg) -> None:
        self._pending.append(arg)
        self._start_idle()

    def _start_idle(self) -> None:
        for w in range(len(self._conns)):
            if w in self._running or not self._pending:
                continue
            arg = self._pending.pop(self._pick(w))
            self._last[w] = self.affinity(arg)
            self._running[w] = arg
            try:
                self._conns[w].send(arg)
            except (BrokenPipeError, OSError):
                pass   # the worker is gone: results() reports it

    def _pick(self, w: int) -> int:
        """The pending job worker `w` takes next (an index into the pending list)."""
        keys = [self.affinity(a) for a in self._pending]
        if self._last[w] is not _NOTHING_YET and self._last[w] in keys:
            return keys.index(self._last[w])
        others = [k for i, k in enumerate(self._last) if i != w and k is not _NOTHING_YET]
        return next((i for i, k in enumerate(keys) if k not in others), 0)

    def results(self):
        try:
            while self._pending or self._running:
                if not self._conns:
                    arg = self._pending.pop(0)
                    yield arg, self.job(arg)
                    continue
                ready = wait([self._conns[w] for w in self._running])
                for w in sorted(self._conns.index(c) for c in ready):
                    arg = self._running.pop(w)
                    try:
                        status, value = self._conns[w].recv()
                    except (EOFError, OSError):
                        raise WorkerDied("a worker process of the plan died (a crash in native "
                                         "code); run with workers=1 to see it") from None
                    except Exception as e:  # noqa: BLE001  (a reply that does not unpickle)
                        raise RuntimeError(f"a worker's reply could not be read: {e}") from None
                    self._start_idle()
                    if status == "error":
                        raise value
                    yield arg, value
        finally:
            self.close()

    def close(self) -> None:
        """Idle workers are told to end; busy ones (results() left early: an error, an
        interrupt) are stopped."""
        for w, (conn, proc) in enumerate(zip(self._conns, self._procs)):
            if w in self._running:
                proc.terminate()
                continue
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs, self._running, self._pending = [], [], {}, []
class WorkerDied(RuntimeError):
    """A worker process ended without returning its job's result."""
