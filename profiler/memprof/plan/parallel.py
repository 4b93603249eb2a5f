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
import multiprocessing.util
import os
import traceback
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler
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
    """A forked worker: run each job received, send back ("ok", result, None) or ("error",
    exception, its traceback's text); None ends it."""
    import torch
    torch.set_num_threads(1)   # a worker is one core: no intra-op threads fighting the others
    while True:
        try:
            arg = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            break
        if arg is None:
            break
        try:
            reply = ("ok", job(arg), None)
        except BaseException as e:  # noqa: BLE001  (every failure goes back to the parent)
            reply = ("error", e, traceback.format_exc())
        try:
            data = ForkingPickler.dumps(reply)
        except Exception as e:  # noqa: BLE001  (a result or exception that does not pickle)
            what = f"the job's result ({type(reply[1]).__name__})" if reply[0] == "ok" else \
                f"its {type(reply[1]).__name__}: {reply[1]}"
            data = ForkingPickler.dumps(("error", RuntimeError(
                f"a plan job's worker could not send back {what}: {type(e).__name__}: {e}"),
                reply[2]))
        try:
            conn.send_bytes(data)
        except (OSError, KeyboardInterrupt):
            break
    conn.close()


class _RemoteTraceback(Exception):
    """The worker-side traceback of a job's exception (its __cause__ in the parent)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.text}\"\"\""


def _stop_workers(conns: list, procs: list, busy: set) -> None:
    """Idle workers are told to end; busy ones (results() left early: an error, an
    interrupt) are stopped."""
    for w, (conn, proc) in enumerate(zip(conns, procs)):
        if w in busy:
            proc.terminate()
            continue
        try:
            conn.send(None)
        except OSError:
            proc.terminate()
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in conns:
        conn.close()


class Pool:
    """`submit(arg)` then `results()`: job(arg) for each, in forked worker processes when
    `workers` > 1, else here in order. `results()` yields (arg, result) as jobs finish and may
    be given more jobs meanwhile (`submit` inside the loop); a job's exception is raised
    there, with the worker's traceback as its cause. `affinity(arg)` (default: none) keys
    the worker a job prefers (see the module docstring). A worker that dies (a crash in
    native code) raises `WorkerDied` for its job. The workers end when results() ends, or at
    the latest when this process exits."""

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
        self._finalizer = None
        if self.workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("fork")
            for _ in range(self.workers):
                here, there = ctx.Pipe()
                # not daemonic: a job may start processes of its own (a DataLoader's workers)
                proc = ctx.Process(target=_worker_loop, args=(there, job))
                proc.start()
                there.close()
                self._conns.append(here)
                self._procs.append(proc)
                self._last.append(_NOTHING_YET)
            # a pool whose results() never ran: its workers end before multiprocessing joins
            # the children at exit (else that join would wait for them for ever)
            self._finalizer = multiprocessing.util.Finalize(
                self, _stop_workers, args=(self._conns, self._procs, set()), exitpriority=10)

    def submit(self, arg) -> None:
        self._pending.append(arg)
        self._start_idle()

    def _start_idle(self) -> None:
        for w in range(len(self._conns)):
            if w in self._running or not self._pending:
                continue
            i = self._pick(w)
            arg = self._pending[i]
            data = ForkingPickler.dumps(arg)    # an argument that does not pickle raises here
            del self._pending[i]
            self._last[w] = self.affinity(arg)
            self._running[w] = arg
            try:
                self._conns[w].send_bytes(data)
            except OSError:
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
                self._start_idle()
                ready = wait([self._conns[w] for w in self._running])
                for w in sorted(self._conns.index(c) for c in ready):
                    arg = self._running.pop(w)
                    try:
                        status, value, remote = self._conns[w].recv()
                    except (EOFError, OSError):
                        raise WorkerDied("a worker process of the plan died (a crash in native "
                                         "code); run with workers=1 to see it") from None
                    except Exception as e:  # noqa: BLE001  (a reply that does not unpickle)
                        raise RuntimeError(f"a worker's reply could not be read: {e}") from None
                    self._start_idle()
                    if status == "error":
                        raise value from (_RemoteTraceback(remote) if remote else None)
                    yield arg, value
        finally:
            self.close()

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer.cancel()
            self._finalizer = None
        if self._conns:
            _stop_workers(self._conns, self._procs, set(self._running))
        self._conns, self._procs, self._running, self._pending = [], [], {}, []


class WorkerDied(RuntimeError):
    """A worker process ended without returning its job's result."""
