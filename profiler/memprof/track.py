"""`memprof.track()`: record a block of training code, then analyse what was recorded.

The block is recorded by a `record.session.Session` (native hook, module scope, steps,
the throughput and - opt-in - health recorders), frozen into a `Run`, wrapped in a `Profile`
and analysed; if the block raised, the profile is saved first (an OOM must not lose the story).
"""
from __future__ import annotations

import numbers
import os
import sys
import threading
import time
from typing import Iterable

import torch

from . import _C
from . import analyse as _analyse
from .analyse import health as _health
from .analyse import throughput as _throughput
from .profile import Profile
from .profile_file import may_replace, recorded_steps, unwritable
from . import track_budget as _budget
from .track_autosave import DEFAULT_AUTOSAVE_S, Autosave, save_where_possible
from .record.distributed import CommRecorder, identity as _rank_identity, rank_path
from .record.compile_watch import CompileRecorder
from .record.cuda_segments import CudaSegmentsRecorder
from .record.health import HealthRecorder
from .record.inputs import InputRecorder
from .record.leak_probe import LeakProbe
from .record.session import DEFAULT_CAPACITY, MAX_CAPACITY, Session
from .record.throughput import ThroughputRecorder
from .record.gradless_params import ParametersWithoutGradients
from .record.untrained_grads import UntrainedGradients
from .run import Run


class Tracker:
    """The context manager behind memprof.track(); after the block it answers like its
    Profile (prof.peak, prof.breakdown(), prof.save(), prof.report()). One block per tracker;
    after it, the tracker holds the profile (data), not the model, optimizer or frame."""

    def __init__(self, model: torch.nn.Module | None = None, optimizer=None, *,
                 path: str | None = None, capacity: int = DEFAULT_CAPACITY,
                 analyses: Iterable | None = None, auto_modules: bool = False,
                 health: bool = False, batch_size: int | None = None, budget=None,
                 step_on: str = "auto", autosave: float | None = DEFAULT_AUTOSAVE_S):
        _budget.check(budget)   # an unknown GPU fails here, not after the training ran
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Real) or \
                not float(capacity).is_integer() or not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity={capacity!r}: expected a whole number of events from 1 "
                             f"to {MAX_CAPACITY:.0e} (e.g. 50_000_000 or 5e7)")
        capacity = int(capacity)
        if analyses is not None and not isinstance(analyses, (str, bytes)):
            analyses = list(analyses)   # (a generator is read once)
        if analyses is not None and (isinstance(analyses, (str, bytes)) or not all(
                callable(a) for a in analyses)):
            # (a list of names ran nothing: every check was off and findings() said [])
            raise TypeError(f"analyses={analyses!r}: expected functions profile -> findings "
                            "(memprof.analyse's defaults when left out)")
        if autosave == 0 and not isinstance(autosave, bool):   # as memprof run --autosave 0
            autosave = None
        if autosave is not None and not (isinstance(autosave, (int, float))
                                         and not isinstance(autosave, bool)
                                         and 0 < autosave < float("inf")):
            raise ValueError(f"autosave={autosave!r}: expected a number of seconds > 0, or 0 / "
                             "None (no save before the block ends)")
        self.autosave_s = autosave
        self._autosave: Autosave | None = None
        self.started = 0.0   # time.monotonic() at the block's start
        self.budget = budget
        self.report_oom_on_exit = True   # print the OOM diagnosis to stderr (memprof run: no)
        # rank and world size where torch.distributed and torchrun say none (cli.spawned)
        self.default_identity: dict | None = None
        recorders = [ThroughputRecorder(), InputRecorder(), CommRecorder(),
                     CudaSegmentsRecorder(), CompileRecorder(), LeakProbe(),
                     UntrainedGradients(), ParametersWithoutGradients()] + \
            ([HealthRecorder(optimizer)] if health else [])
        self.session = Session(model, optimizer, capacity=capacity, auto_modules=auto_modules,
                               batch_size=batch_size, recorders=recorders, step_on=step_on)
        self.path = path
        self.profile: Profile | None = None
        self.saved: str | None = None     # where the profile was saved, once it was
        self.save_error: str | None = None   # why it is not at its path (saved elsewhere or not)
        # memprof run: a block that recorded nothing leaves an existing file as it was
        self.keep_a_profile_over_nothing = False
        self.kept_existing = False
        self.forked_away = False   # this is a child forked inside the block: no profile here
        self._entered = False
        self._start_dir = ""
        self.analyses = list(analyses) if analyses is not None else None

    # ------------------------------------------------------------------ while recording
    @property
    def roots(self) -> list[tuple[str, dict]]:
        """(prefix, namespace) pairs also searched for holders of leaked tensors."""
        return self.session.roots

    def step(self) -> None:
        """Mark a step boundary, for loops that do not call an optimizer."""
        self._recording("step").end_step()

    def log(self, **values) -> None:
        """Record numbers for the current optimizer step, e.g. prof.log(loss=loss.item());
        `loss` feeds the training-health checks (pass a float: a tensor costs a sync)."""
        self._recording("log").log(values)

    def log_step(self, step: int, **values) -> None:
        """Record numbers for an optimizer step already ended (0-based), for frameworks that
        report the loss after the optimizer step (memprof.integrations)."""
        self._recording("log_step").log(values, step=step)

    def _recording(self, what: str) -> Session:
        if self.session is None:   # ('NoneType' object has no attribute 'log')
            raise RuntimeError(f"prof.{what}(): the track() block has ended; call it inside "
                               "the block")
        return self.session

    # ------------------------------------------------------------------ after the block
    @property
    def throughput(self) -> dict:
        """Step time, phases, samples/s, micro-steps (memprof.analyse.throughput)."""
        return _throughput.summarize(self._finished("throughput"))

    @property
    def health(self) -> dict | None:
        """Training health (memprof.analyse.health); None without health=True or log()."""
        return _health.summarize(self._finished("health"))

    def _finished(self, what: str) -> Profile:
        if self.profile is None:
            raise RuntimeError(f"{what}: available once the track() block has exited")
        return self.profile

    def __repr__(self) -> str:
        if self.profile is not None:
            return repr(self.profile)
        if self.forked_away:
            return "<memprof.track: a process forked inside the block; its parent has the profile>"
        if self.session is not None and self._entered and self.session.pid == os.getpid() \
                and not self.session.stopped:
            return f"<memprof.track: recording, {int(_C.counters()['records']):,} events so far>"
        if self._entered:
            return "<memprof.track: ended without a profile (see the error it raised)>"
        return "<memprof.track: not started; use it as `with memprof.track(model) as prof:`>"

    def _repr_html_(self) -> str | None:
        """Jupyter: the report once the block has ended (None before: the one line)."""
        return self.profile._repr_html_() if self.profile is not None else None

    def __getattr__(self, name):
        profile = self.__dict__.get("profile")
        if profile is not None:
            return getattr(profile, name)
        raise AttributeError(f"{name!r}: the profile is available once the track() block has "
                             "exited" if not name.startswith("_") else name)

    # ------------------------------------------------------------------ context protocol
    def __enter__(self) -> "Tracker":
        if self._entered:
            raise RuntimeError("memprof.track: this tracker has already recorded a block; call "
                               "memprof.track(...) again for the next block")
        # a relative path names a file where the block started: code that changes directory
        # inside it (hydra's runs) does not move the profile (a deleted directory: as given)
        try:
            self._start_dir = os.getcwd()
        except OSError:
            self._start_dir = ""
        if self.path is not None:
            self._check_target()
        self.started = time.monotonic()
        self.session.start(sys._getframe(1))
        self._entered = True
        if self.session.outer is None:
            self._leave_at_os_exit()
        if self.path is not None and self.autosave_s is not None and \
                self.session.outer is None:
            try:
                self._autosave = Autosave(self, self.autosave_s)
                self._autosave.install(self.session)
            except BaseException:   # the block is not entered: nothing may stay recording
                self._autosave = None
                self.session.stop()
                raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if isinstance(exc, SystemExit) and exc.code in (None, 0):
            exc = None   # sys.exit() / sys.exit(0): the code ended normally
        # when the block was left by its error, on the wall clock that the ranks of a job
        # share: which rank failed first (the others' errors follow from it)
        failed_at = time.time() if exc is not None else None
        if self.session.forked_away:   # a child forked inside the block: the parent profiles
            self.forked_away = True
            self.session = None
            return False
        if self._autosave is not None:   # (stop may end a last step: no save then)
            self._autosave.remove(self.session)
        self.session.stop(exc)
        nested = self.session.outer is not None
        self.profile = Profile(Run.from_session(self.session))
        self.note_rank(self.profile)
        if failed_at is not None and "error" in self.profile.run.meta:
            self.profile.run.meta["error_unix_s"] = failed_at
        if self._autosave is not None:   # the steps it saved in: their time was the save's
            self.profile.run.records["autosave"] = self._autosave.record()
        # a nested block is analysed as any (a script's own `assert not memprof.findings(prof)`
        # under `memprof run` passed whatever its block leaked: it found nothing)
        _analyse.analyse(self.profile, self.analyses)
        if not nested:
            _budget.plan(self, exc)            # budget replay; what would fit an OOM
        self._save(exc, nested)
        if not nested and exc is not None and self.report_oom_on_exit:
            _budget.print_diagnosis(self.profile)   # to stderr, before the traceback
        # the session can outlive the block (dynamo's table of torch functions keeps a wrapper
        # of it): it lets go of the frame and namespaces it searched, or a script's globals
        # under `memprof run` were never finalized in time (a __del__ at exit saw None)
        self.session.frame, self.session.roots = None, []
        self.session = None   # the profile is data: don't keep the model, optimizer or frame
        return False  # never swallow the user's exception

    def _check_target(self) -> None:
        """A path where no profile can be written (a missing or read-only directory) or where
        a file that is no profile lies (a script, data: a mistyped path) is refused before the
        block records, as `memprof run -o` refuses it; a profile or an empty file (a
        NamedTemporaryFile, a scheduler's placeholder) there is replaced."""
        target = self.target(self.identity())
        # a directory that is missing or read-only failed every autosave silently and the
        # last save at the block's end: a long run ended without its profile
        problem = unwritable(target)
        if problem is not None:
            raise ValueError(f"track(path={self.path!r}): {problem}")
        if not may_replace(target):
            raise ValueError(f"track(path={self.path!r}): {target!r} exists and is not a "
                             "memprof profile (it would be replaced); remove it or give "
                             "another file name")

    def _leave_at_os_exit(self) -> None:
        """os._exit ends the process at once, without unwinding the block (a script that ends
        with it to skip a slow or hanging teardown): the block is left first - the profile
        saved as at sys.exit(status) - when the thread that entered it calls it, in its
        process. Not from another thread (a watchdog's `threading.Timer(600, os._exit)` while
        the loop hangs in a collective: leaving the block would wait on the hung device, and
        the loop's thread still writes the session), nor in a forked child (multiprocessing's
        and a DataLoader worker's end with os._exit). Undone with the block's other patches."""
        real_exit, pid, tracker = os._exit, os.getpid(), self
        thread = threading.current_thread()

        def _exit(status):
            session = tracker.session
            if os.getpid() == pid and threading.current_thread() is thread and \
                    session is not None and not session.forked_away:
                try:
                    tracker.__exit__(SystemExit, SystemExit(status), None)
                    if tracker.saved:
                        print(f"memprof: os._exit({status}) ended the block; profile saved "
                              f"to {tracker.saved}", file=sys.stderr, flush=True)
                except BaseException:  # noqa: BLE001  (the process ends as asked, whatever)
                    pass
            real_exit(status)
        self.session.patches.set(os, "_exit", _exit)
        for name in ("execv", "execve"):   # (os.execl, execvp, ... call these two)
            if hasattr(os, name):
                self.session.patches.patch(os, name, lambda real, name=name:
                                           self._leave_at_exec(real, name, pid, thread))

    def _leave_at_exec(self, real_exec, name: str, pid: int, thread):
        """os.execv / os.execve replace the process (a script that restarts itself with
        `os.execv(sys.executable, [sys.executable] + sys.argv)`): nothing after runs, and the
        profile was lost without a word; the block is left first, as at os._exit, and the new
        program, python's command line, runs without memprof - said in one line."""
        tracker = self

        def exec_(path, args, *env):
            session = tracker.session
            # (a path that cannot run raises as under python, the block still open: execvp
            # tries each directory of PATH in turn)
            if os.getpid() == pid and threading.current_thread() is thread and \
                    session is not None and not session.forked_away and \
                    isinstance(path, (str, bytes, os.PathLike)) and os.access(path, os.X_OK):
                try:
                    tracker.__exit__(None, None, None)
                    where = f"; profile saved to {tracker.saved}" if tracker.saved else ""
                    print(f"memprof: os.{name}({path!r}, ...) replaced the process{where}; "
                          f"the new program runs without memprof", file=sys.stderr,
                          flush=True)
                except BaseException:  # noqa: BLE001  (the process is replaced as asked)
                    pass
            return real_exec(path, args, *env)
        return exec_

    def identity(self, records: dict | None = None) -> dict:
        """Under torchrun / torch.distributed: rank, world_size, local_rank, dist_backend
        (and run_id), as seen while the block ran (`records`: a run's, whose communication
        record noted it), else {}."""
        comm = (records or {}).get("communication") or {}
        return comm.get("identity") or _rank_identity() or self.default_identity or {}

    def note_rank(self, profile: Profile) -> None:
        """The identity in the profile's meta."""
        profile.run.meta.update(self.identity(profile.run.records))

    def target(self, meta: dict, path: str | None = None) -> str:
        """Where a profile with `meta` is saved: `path` (the block's unless given) relative to
        where the block started, one file per rank in a job."""
        target = os.path.join(self._start_dir, path or self.path)   # as given if absolute
        if meta.get("rank") is not None:   # one file per rank of a job
            target = rank_path(target, int(meta["rank"]))
        return target

    def _save(self, exc, nested: bool) -> None:
        target = self.path
        if target is None and exc is not None and not nested:
            target = f"memprof-{os.getpid()}-{time.time_ns()}.memprof"   # (blocks a second)
        if target is None:
            return
        target = self.target(self.profile.meta, target)
        if self.keep_a_profile_over_nothing and not self.profile.memory.size and \
                not self.profile.marker_positions("step").size and recorded_steps(target):
            # `memprof run train.py --help` (or a typo in its arguments) replaced the profile
            # of the long run before it with an empty one
            ended = (f"the script exited with status {exc.code}" if isinstance(exc, SystemExit)
                     else f"the script raised {type(exc).__name__}" if exc is not None
                     else "the script ended")
            print(f"memprof: nothing was recorded ({ended} before allocating); {target} "
                  "kept as it was", file=sys.stderr)
            self.kept_existing = True
            return
        written, why = save_where_possible(self.profile, target)   # (directory gone, disk full)
        if why is not None:
            self.save_error = f"could not save it to {target} ({why})"
            print(f"memprof: could not save the profile to {target} ({why})"
                  + (f"; saved it to {written} instead" if written else ""), file=sys.stderr)
            if written is None:
                return
        self.saved = target = written
        earlier = self._autosave.elsewhere if self._autosave is not None else None
        if earlier is not None and earlier != target:
            try:   # the saves the path could not take: this one, at the path, replaces them
                os.remove(earlier)
            except OSError:
                pass
        # sys.exit(3) is the code's own way to end, not a crash: said only where memprof
        # chose the file's name (`memprof run` prints where it saved, as for any run)
        if exc is not None and (not isinstance(exc, SystemExit) or self.path is None):
            print(f"memprof: the tracked code raised {type(exc).__name__}; profile saved "
                  f"to {target}", file=sys.stderr)


def track(model: torch.nn.Module | None = None, optimizer=None, *, path: str | None = None,
          capacity: int = DEFAULT_CAPACITY, analyses=None, auto_modules: bool = False,
          health: bool = False, batch_size: int | None = None, budget=None,
          step_on: str = "auto", autosave: float | None = DEFAULT_AUTOSAVE_S) -> Tracker:
    """Record every allocation and free made inside the block.

    model: attributes allocations to its submodules (no hook is set: module calls are
    scoped by memprof's Module.__call__ for the block) and names parameters.
    optimizer: restrict step detection to this optimizer (default: any optimizer's step).
    path: save the profile there on exit (also when the block raises; then a default path is
    used if none is given). In a distributed job (torchrun, torch.distributed) each rank
    writes `<name>.rank<R>.memprof` and the profile's meta says rank, world_size,
    local_rank and dist_backend; collectives are timed (the throughput table's
    communication) and the buffers they use are categorised as "communication". After the
    block, the returned object answers like a Profile.
    analyses: functions profile -> findings to run instead of memprof.analyse's defaults.
    auto_modules: without a model, attribute to whatever modules run (named as they run;
    what `memprof run` uses on an unmodified script).
    health: also record training health (grad norm before/after clipping, LR per step, LR
    scheduler order, loss spikes, non-finite values); see memprof.analyse.health.
    batch_size: samples per micro-step for samples/s (default: the leading dimension of the
    root module's first input); see memprof.analyse.throughput.
    budget: a GPU ("v100-16gb", see `memprof gpus`) or a byte count: the recorded stream is
    replayed through the caching-allocator model with that GPU's usable memory - whether and
    where this run would run out on it (or when, if memory grows), and what would fit instead
    (estimates; prof.meta["budget"], prof.meta["fit"]; an outermost block's profile only).
    See memprof.plan.budget.
    step_on: what ends a step - "auto" (an optimizer step, else a parameter change after a
    backward), "optimizer", "backward" (every backward call) or "manual" (prof.step() only);
    prof.step() ends a step in every mode.
    autosave: with a path, also save the profile so far at the first step end after each
    multiple of `autosave` seconds on the wall clock (marked partial, replaced by the block's
    own save at its end; later saves spaced by their cost), so that a
    run killed outright - the kernel's OOM killer (exit status 137), kill -9 - still leaves
    one; None: save at the end only. See memprof.track_autosave.
    If the block runs out of memory, a diagnosis (who filled the device, leak or step too big,
    what would fit) is printed to stderr before the exception leaves the block.
    """
    return Tracker(model, optimizer, path=path, capacity=capacity, analyses=analyses,
                   auto_modules=auto_modules, health=health, batch_size=batch_size,
                   budget=budget, step_on=step_on, autosave=autosave)
