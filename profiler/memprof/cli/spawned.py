"""Processes a script starts with torch.multiprocessing (`mp.spawn(train, nprocs=2)`, the
shape of PyTorch's DDP tutorial, or `start_processes`) or with multiprocessing.Process around
a function of its own (or a Process subclass whose run() trains), under `memprof run`.

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
import multiprocessing.process
import os
import signal
import sys
import threading

from ..profile_file import read_meta
from ..record.distributed import rank_path
from ..record.holders import is_user_code
from ..units import fmt_bytes
from .base import stdout_to_devnull
from .run_report import print_report, rank_glob, shown_path
from .signals import ExitSignals, Terminated
from .step_on import install_in_process


class SpawnWatch:
    """Hands each process torch.multiprocessing starts to run_tracked, while the script runs
    (through the run's patch registry, so it is undone with sys.argv)."""

    def __init__(self, output: str, options: dict, as_json: bool = False,
                 base: str | None = None, step_on: str | None = None, script: str = ""):
        self.output = output       # absolute
        # what each process needs, as plain data (pickled for it): memprof.track's options,
        # the report's form, the directory paths are shown from, run's --step-on and script
        self.job = {"options": options, "json": as_json, "base": base, "step_on": step_on,
                    "script": script}
        # [output, processes started] per start_processes call, and one for all of the
        # multiprocessing.Process starts (_process_call, made at the first)
        self.calls: list[list] = []
        self._process_call: list | None = None
        self._counting = threading.Lock()   # two threads starting processes get two ranks

    @property
    def started(self) -> int:
        return sum(n for _, n in self.calls)

    def _new_call(self, processes: int) -> list:
        """A job's [output, processes]: the run's output for the first, then files of their
        own (`job.call2.rank0.memprof`, not rank 0's file overwritten beside the first
        job's rank 1: an evaluation job after the training one)."""
        stem, ext = os.path.splitext(self.output)
        output = self.output if not self.calls else \
            f"{stem}.call{len(self.calls) + 1}{ext or '.memprof'}"
        self.calls.append([output, processes])
        return self.calls[-1]

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
            nprocs = int(bound.arguments["nprocs"])
            output, _ = watch._new_call(nprocs)
            bound.arguments["fn"] = functools.partial(
                run_tracked, bound.arguments["fn"], {**watch.job, "output": output,
                                                     "nprocs": nprocs})
            return original(*bound.args, **bound.kwargs)

        # spawn() calls its module's global; a script may call either name
        patches.set(spawn_module, "start_processes", start_processes)
        patches.set(torch.multiprocessing, "start_processes", start_processes)
        patches.patch(multiprocessing.process.BaseProcess, "start", self._start_wrapper)

    def _start_wrapper(self, original):
        """`multiprocessing.Process(target=run, args=(rank, size)).start()` (the other DDP
        tutorial's shape, torch.multiprocessing.Process included), or a Process subclass of
        the user's whose run() does the work: the user's own code is recorded as rank <R>
        (its torch.distributed rank, else the order it was started in) with a one-line
        report; the processes of torch and of libraries (a DataLoader's workers, a Pool's,
        start_processes' own wrapper) are left as they are."""
        watch = self

        def start(process):
            own_run = _own_run(process)
            target = getattr(process, "_target", None)
            user_target = target is not None and \
                is_user_code(getattr(target, "__module__", None))
            if not (own_run or user_target):
                return original(process)
            with watch._counting:
                if watch._process_call is None:
                    watch._process_call = watch._new_call(0)
                output, index = watch._process_call
                watch._process_call[1] += 1   # (before the start: another's gets the next)
            job = {**watch.job, "output": output, "index": index}
            before = process._popen   # a new one once started (a second start raises)
            # the whole run() of a class's own (a target it calls included, recorded once):
            # an attribute of the instance, which the child's bootstrap calls; either is in the
            # child once start() returns (forked, or pickled with the process under spawn)
            if own_run:
                process.run = functools.partial(run_tracked_process, job)
            else:
                process._target = functools.partial(run_tracked_target, target, job)
            try:
                return original(process)
            finally:
                if own_run:
                    del process.run
                if process._popen is before:   # refused (started twice, a daemon's child)
                    if not own_run:
                        process._target = target
                    with watch._counting:
                        if watch._process_call[1] == index + 1:
                            watch._process_call[1] = index
        return start

    def note(self) -> str | None:
        """What the parent says once its script ended: where the processes' profiles are."""
        if not self.calls:
            return None
        jobs, single = [], []
        for output, processes in self.calls:
            merged, files = self._reports(output, processes)
            if merged:
                jobs.append(merged)
            else:
                single.extend(files)
        parts = (["one report per job: " + "; ".join(f"memprof report {j}" for j in jobs)]
                 if jobs else []) + \
            (["one report per process (no process group: not ranks of one job): "
              + ", ".join(f"memprof report {f}" for f in single)] if single else [])
        if not parts:   # every process failed before its save, or none has ended yet
            return (f"memprof: the script ran {self.started} processes of its own; none has "
                    "saved a profile")
        return (f"memprof: the script ran {self.started} processes of its own, each saving "
                f"its own profile; " + "; ".join(parts))

    def _reports(self, output: str, processes: int) -> tuple[str | None, list[str]]:
        """One call's files as the report takes them: (the merged pattern, []) where every
        file is a rank of one job - torch.multiprocessing's, Processes that joined a process
        group - else (None, each file): Processes without a group have no rank to merge by
        (the merged command the parent printed failed)."""
        base = self.job["base"]
        files = [f for f in (rank_path(output, i) for i in range(processes))
                 if os.path.exists(f)]
        if not files:
            return None, []
        metas = [read_meta(f) or {} for f in files]
        if all(m.get("rank") is not None and m.get("world_size") for m in metas):
            return rank_glob(shown_path(rank_path(output, 0), base)), []
        return None, [shown_path(f, base) for f in files]


def run_tracked(fn, job: dict, index: int, *args) -> None:
    """One process torch.multiprocessing started: fn(index, *args) recorded as a rank, its
    profile saved also when fn raises (the error then reaches torch's handler as before) or
    when SIGTERM stops it (torch stops the other processes once one failed): it then ends by
    that signal, as it would have. Without a process group its rank is its index among the
    call's processes (the files merge as a job's)."""
    _run_as_rank(functools.partial(fn, index, *args), job, index)


def _run_as_rank(call, job: dict, index: int) -> None:
    import memprof
    path = rank_path(job["output"], index)
    options = dict(job["options"])
    # --step-on a function: its calls end this process's steps too (the tracker is made
    # below, before the function can run)
    if install_in_process(job.get("step_on"), job.get("script", ""), lambda: tracker.step()):
        options["step_on"] = "manual"
    tracker = memprof.track(auto_modules=True, path=path, **options)
    tracker.session.capacity_knob = "memprof run --capacity"
    if "nprocs" in job:
        tracker.default_identity = {"rank": index, "world_size": job["nprocs"]}
    main = sys.modules.get("__mp_main__") or sys.modules.get("__main__")
    if main is not None:   # the script, imported again in this process: holders are named
        tracker.roots.append(("", main.__dict__))
    status, stopped_by = 1, None
    with ExitSignals(process_ends=True) as signals:   # (the process ends after `call`)
        try:
            with tracker:
                try:
                    call()
                finally:
                    signals.finish()
            status = 0
        except Terminated as exc:
            stopped_by = exc.signum
        finally:
            if not tracker.forked_away:
                _report(tracker, path, status, job, index)
        _, signum = signals.status(status, stopped_by)
    if signum is not None:
        sys.stdout.flush()   # the report: what the signal's default action would drop
        sys.stderr.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def run_tracked_target(target, job: dict, *args, **kwargs) -> None:
    """A multiprocessing.Process's target of the user's code, recorded as run_tracked does
    (its index: the order it was started in; no world size unless torch.distributed's)."""
    _run_as_rank(functools.partial(target, *args, **kwargs), job, job["index"])


def _own_run(process) -> bool:
    """Whether a Process's class overrides run() in the user's code (`class Trainer(Process)`
    with the training in run(), no target)."""
    run = getattr(type(process), "run", None)
    return run is not multiprocessing.process.BaseProcess.run and "run" not in vars(process) \
        and is_user_code(getattr(run, "__module__", None))


def run_tracked_process(job: dict) -> None:
    """A Process subclass's own run() in the process it started (the instance is this
    process's current_process()), recorded as run_tracked_target does."""
    process = multiprocessing.current_process()
    del process.run   # ours: the class's run() again, bound as it binds (static, class...)
    _run_as_rank(process.run, job, job["index"])


def _report(tracker, path: str, status: int, job: dict, index: int) -> None:
    """The process's report; never an error of its own (a closed pipe, `memprof run s.py |
    head`, failed the process, and torch then stopped the others)."""
    try:
        if "nprocs" in job:   # torch.multiprocessing's: one job's ranks
            print_report(tracker, path, status, as_json=job["json"], process_index=index,
                         base=job["base"])
        elif tracker.profile is not None:   # a Process of the script's: one line each
            rank = tracker.profile.meta.get("rank", index)
            saved = f"; profile saved to {shown_path(tracker.saved, job['base'])}" \
                if tracker.saved else ""
            print(f"memprof: process {rank} peak {fmt_bytes(tracker.profile.peak)}{saved}",
                  file=sys.stderr if job["json"] else sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_to_devnull()
