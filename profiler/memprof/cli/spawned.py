"""Processes a script starts with torch.multiprocessing (`mp.spawn(train, nprocs=2)`, the
shape of PyTorch's DDP tutorial, or `start_processes`) under `memprof run`.

Such a process is a fresh interpreter running the script's function: the block `memprof run`
opened in the parent does not reach it, so the report had 0 events while the training ran
next to it. For the script's run, torch.multiprocessing's `start_processes` (which `spawn`
calls) hands each process `run_tracked` around the script's function instead: the process
records itself as a torchrun rank does (`<output>.rank<R>.memprof`, R its torch.distributed
rank, else its process index), rank 0 prints its report, the others one line, and the parent
says where the files are and how to merge them.
"""
from __future__ import annotations

import functools
import inspect
import os
import signal
import sys

from ..record.distributed import rank_path
from .run_report import print_report, rank_glob
from .signals import ExitSignals, Terminated


class SpawnWatch:
    """Hands each process torch.multiprocessing starts to run_tracked, while the script runs
    (through the run's patch registry, so it is undone with sys.argv)."""

    def __init__(self, output: str, options: dict, as_json: bool = False):
        self.output = output
        self.options = options     # memprof.track's options for each process: plain data
        self.as_json = as_json
        self.started = 0           # processes started so far

    def install(self, patches) -> None:
        import torch.multiprocessing
        spawn_module = sys.modules["torch.multiprocessing.spawn"]
        original = spawn_module.start_processes
        signature = inspect.signature(original)
        watch = self

        @functools.wraps(original)
        def start_processes(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            bound.arguments["fn"] = functools.partial(
                run_tracked, bound.arguments["fn"], watch.output, watch.options, watch.as_json)
            watch.started += int(bound.arguments["nprocs"])
            return original(*bound.args, **bound.kwargs)

        # spawn() calls its module's global; a script may call either name
        patches.set(spawn_module, "start_processes", start_processes)
        patches.set(torch.multiprocessing, "start_processes", start_processes)

    def note(self) -> str | None:
        """What the parent says once its script ended: where the processes' profiles are."""
        if not self.started:
            return None
        first = rank_path(self.output, 0)
        return (f"memprof: the script ran {self.started} processes through "
                f"torch.multiprocessing; each saved its own profile ({first}, ...); one report "
                f"for all of them: memprof report {rank_glob(first)}")


def run_tracked(fn, output: str, options: dict, as_json: bool, index: int, *args) -> None:
    """One process torch.multiprocessing started: fn(index, *args) recorded as a rank, its
    profile saved also when fn raises (the error then reaches torch's handler as before) or
    when SIGTERM stops it (torch stops the other processes once one failed): it then ends by
    that signal, as it would have."""
    import memprof
    tracker = memprof.track(auto_modules=True, path=rank_path(output, index), **options)
    main = sys.modules.get("__mp_main__") or sys.modules.get("__main__")
    if main is not None:   # the script, imported again in this process: holders are named
        tracker.roots.append(("", main.__dict__))
    status, stopped_by = 1, None
    with ExitSignals() as signals:
        try:
            with tracker:
                try:
                    fn(index, *args)
                finally:
                    signals.finish()
            status = 0
        except Terminated:
            stopped_by = signal.SIGTERM
        finally:
            if not tracker.forked_away:
                print_report(tracker, rank_path(output, index), status, as_json=as_json,
                             process_index=index)
        _, signum = signals.status(status, stopped_by)
    if signum is not None:
        sys.stdout.flush()   # the report: what the signal's default action would drop
        sys.stderr.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
