"""A recording session: the native hook plus everything installed in Python while the user's
code runs, and removed on exit whatever happened (an exception, an OOM, Ctrl-C).

    session = Session(model, optimizer, recorders=[ThroughputRecorder(), ...])
    with session:
        ...training...
    run = memprof.run.Run.from_session(session)      # the frozen result

A recorder is any object with `name`, `install(session)`, `remove()` and `record() -> plain
data` (JSON-able: it is saved with the profile). It subscribes to `session.scope` (forward
passes), `session.steps` (optimizer steps, step ends), `session.backward` (backward calls) and
patches through `session.patches`; it never reaches into another recorder.

One session records the whole process: every thread that allocates while it runs (threads
started inside the block, and threads that existed before it, attached natively on their
first op). A block nested in the recording thread shares it; a block started in another thread
while one records is refused with the name of the recording thread - except inside `memprof
run`'s own block, which stands for no block of the script's: there a script's block nests from
whichever thread starts it, one thread's blocks at a time, as python alone would allow.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings

import numpy as np
import torch

from .. import _C
from .event_streams import EventStreams, behind_baseline, fill_baseline
from .holders import is_library_frame
from .events import CAT_PARAMETERS, EVENT_DTYPE, KIND_MARK, SEQ_DTYPE
from .patches import PatchRegistry
from .auto_steps import AutoSteps
from .root_names import class_name
from .scope import ModuleScope
from .update_watch import label_updates
from .snapshots import Snapshot, SnapshotRecorder
from .steps import BackwardHook, StepClock

DEFAULT_CAPACITY = 20_000_000  # events; the excess is counted as dropped
#: the largest capacity memprof run takes (EVENT_DTYPE.itemsize bytes each: 7.2 TB at 72)
MAX_CAPACITY = 10**11

_active: "Session | None" = None
_start_lock = threading.Lock()


def active_session() -> "Session | None":
    return _active


def _warn_if_not_the_outer_blocks(inner: "Session", outer: "Session") -> None:
    """A nested block records through the outer one's hooks: a model the outer block does not
    name has no modules in it, and an optimizer it does not watch marks no steps (the inner
    profile of `track(b, opt_b)` inside `track(a, opt_a)` put all of b's memory outside any
    module, in one step). Said once, at the start, with what to do instead."""
    outer_modules = {id(m) for r in outer.scope.root_modules() for m in r.modules()}
    model, opt = inner.scope.model, inner.steps.optimizer
    unnamed = model is not None and not outer.scope.auto and id(model) not in outer_modules
    unwatched = opt is not None and outer.steps.optimizer is not None and \
        opt is not outer.steps.optimizer
    if unnamed or unwatched:
        what = " and ".join(w for w, bad in (("its model's modules", unnamed),
                                             ("its optimizer's steps", unwatched)) if bad)
        _warn(lambda: warnings.warn(
            f"memprof.track inside another track block records through the outer block's "
            f"hooks: {what} are not the outer block's, so this block's profile will not "
            "attribute them; track the models in one block (track(optimizer=None) watches "
            "every optimizer) or one after the other", RuntimeWarning, stacklevel=6))


def _leave_forked_child() -> None:
    """A forked child (a DataLoader worker, multiprocessing's fork) inherits the session
    recording at the fork: the native side stopped there, and here its hooks come off the
    child (its torch runs as untracked, and a block the child enters is a session of its
    own; one forked while other threads of the parent allocated may hang there, on a PyTorch
    lock held at the fork that tracking takes: the spawn start method has no such hazard).
    A block the child goes on running (a bare os.fork()) ends without a profile: the
    parent's is the run's."""
    global _active, _start_lock
    _start_lock = threading.Lock()   # a parent's thread may have held it at the fork
    session, _active = _active, None
    if session is None:
        return
    try:
        try:
            session.auto_steps.close()
        finally:
            session._uninstall(in_forked_child=True)
    finally:
        _C.release_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_leave_forked_child)


def _warn_at_block(message: str, frame) -> None:
    """A RuntimeWarning shown at the user's `with memprof.track(...)` line: warnings.warn
    showed memprof's own source line (session.py) under it. Under `memprof run` the block is
    memprof's: no line is shown."""
    if frame is not None and not is_library_frame(frame):
        _warn(lambda: warnings.warn_explicit(
            message, RuntimeWarning, frame.f_code.co_filename, frame.f_lineno,
            module=frame.f_globals.get("__name__"), registry=_WARNED))
    else:
        _warn(lambda: warnings.warn_explicit(message, RuntimeWarning, "memprof", 0,
                                             registry=_WARNED))


def _warn(emit) -> None:
    """Runs `emit`, a warnings call of memprof's own (a stacklevel in it counts `emit` and
    this function as two frames): under a filter that makes warnings
    errors (`pytest -W error`, `warnings.simplefilter("error")`) it raised out of the block
    as it was left, and the profile was lost (nothing saved, no report). Printed instead."""
    try:
        emit()
    except Warning as warning:
        print(f"memprof: {warning}", file=sys.stderr)


#: the warnings shown, as warnings.warn keeps them per module: once per text and line
_WARNED: dict = {}


class Session:
    def __init__(self, model: torch.nn.Module | None = None, optimizer=None, *,
                 capacity: int = DEFAULT_CAPACITY, auto_modules: bool = False,
                 batch_size: int | None = None, recorders=(), step_on: str = "auto"):
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module or None, got "
                            f"{type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer or None, got "
                            f"{type(optimizer).__name__}")
        if batch_size is not None and (isinstance(batch_size, bool)
                                       or not isinstance(batch_size, int) or batch_size <= 0):
            raise ValueError(f"batch_size: expected a positive int or None, got {batch_size!r}")
        self.model = model
        self.capacity = int(capacity)
        self.batch_size = batch_size
        self.recorders = list(recorders)
        # what raises the capacity, where the log fills: `memprof run` has its option
        self.capacity_knob = "track(capacity=...)"
        self.steps = StepClock(optimizer, step_on)   # what ends a step (record.steps)
        self.scope = ModuleScope(model, auto_modules, self.steps)
        self.backward = BackwardHook(self.steps)
        self.patches = PatchRegistry()
        self.snapshots = SnapshotRecorder(self)
        self.auto_steps = AutoSteps(self)
        self.logs: list[tuple[int, str, float]] = []
        self.frame = None           # the code that entered the block: roots for holders
        self.roots: list[tuple[str, dict]] = []   # (prefix, namespace) also searched
        self.outer: Session | None = None
        self.pid: int | None = None    # the process that entered the block
        self.thread: threading.Thread | None = None   # the thread that started recording
        # memprof run's block: the script's own blocks nest in it from any thread (below)
        self.nests_any_thread = False
        self.nested_threads: dict[threading.Thread, int] = {}   # open nested blocks, by thread
        self._nested_thread: threading.Thread | None = None
        self.stopped = False            # an outermost block's log has been taken
        self._nested_label = ""
        self._lent: set[str] = set()   # names of recorders a nested block lent the outer
        self.first_step = 0            # a nested block: the outer block's step at its start
        self._prev_thread_profile = None
        # filled by stop(): what Run.from_session reads
        self.streams: EventStreams | None = None
        self.strings: list[str] = []
        self.seq_records: np.ndarray | None = None
        self.snapshot_list: list[Snapshot] = []
        self.module_names: list[str] = []
        self.meta: dict = {}
        self.records: dict = {}

    # ------------------------------------------------------------------ what recorders ask
    @property
    def optimizer(self):
        return self.steps.optimizer

    @property
    def step(self) -> int:
        return (self.outer or self).steps.step

    def params(self) -> list[torch.Tensor]:
        """Parameters of the model (or the roots seen), and of the watched optimizers."""
        params: dict[int, torch.Tensor] = {}
        for model in self.scope.root_modules():
            for p in model.parameters():
                params[id(p)] = p
        for opt in self.steps.watched():
            for g in opt.param_groups:
                for p in g["params"]:
                    params[id(p)] = p
        return list(params.values())

    def end_step(self) -> None:
        """A step boundary, for loops without an optimizer (prof.step())."""
        (self.outer or self).steps.end_step()

    def log(self, values: dict, step: int | None = None) -> None:
        """Numbers for the current optimizer step (prof.log(loss=...)) - the one that just
        ended while no pass or backward began since (a loss logged after optimizer.step()) -
        or for `step` (a framework that reports the loss after the optimizer step:
        memprof.integrations)."""
        target = self.outer or self
        if step is None:
            clock = target.steps
            step = clock.step if clock.began or clock.step == 0 else clock.step - 1
        for name, v in values.items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise ValueError(f"log({name}=...): expected a number or a one-element "
                                     f"tensor, got a tensor of shape {tuple(v.shape)}")
                v = float(v.detach().reshape(()).item())
            elif not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool):
                raise ValueError(f"log({name}=...): expected a number or a one-element tensor, "
                                 f"got {type(v).__name__}")
            target.logs.append((int(step), str(name), float(v)))

    # ------------------------------------------------------------------ start / stop
    @property
    def forked_away(self) -> bool:
        """True in a child forked inside the block: nothing was recorded there."""
        return self.pid is not None and self.pid != os.getpid()

    def start(self, frame=None) -> None:
        global _active
        self.pid = os.getpid()
        with _start_lock:   # two threads entering at once: one records, the other is refused
            if _active is not None:
                _check_may_nest(_active)
                # Nested block: share the outer session, keep our own slice of its events,
                # with what was alive at its start that this block can name (its model's
                # parameters, its optimizer's state), as a block of its own would.
                self.outer = _active
                self.first_step = _active.steps.step   # its steps count from here
                self.frame = frame   # (its leak check names holders from its frame)
                _warn_if_not_the_outer_blocks(self, _active)
                self._lend_recorders(_active)
                self.snapshots.collect_baseline()
                self._nested_label = f"nested_start:{id(self)}"
                _C.mark(self._nested_label, 0)
                here = threading.current_thread()   # (counted once nothing above can raise)
                _active.nested_threads[here] = _active.nested_threads.get(here, 0) + 1
                self._nested_thread = here
                return
            self.frame = frame
            self.thread = threading.current_thread()
            self.snapshots.collect_baseline()
            _C.start(self.capacity)
            _active = self
        try:
            self._install()
        except BaseException:
            self._uninstall()
            _C.stop()
            _active = None
            raise

    def _install(self) -> None:
        self.steps.install(self.patches)
        self.scope.install(self.patches)
        self.snapshots.install()
        self.backward.install(self.patches)
        self.auto_steps.install()
        _name_torch_profiler_conflict(self.patches)
        # recorders before the thread hook: their own threads (GPU sampler) are not recorded
        for rec in self.recorders:
            rec.install(self)
        self._prev_thread_profile = threading.getprofile()
        if self._prev_thread_profile is None:
            threading.setprofile(_attach_new_thread)

    def _uninstall(self, in_forked_child: bool = False) -> None:
        """Hooks and patches off; in a forked child not the recorders' own ends (a GPU
        sampler's thread is not there, and CUDA must not be touched after a fork)."""
        for rec in () if in_forked_child else reversed(self.recorders):
            try:
                rec.remove()
            except Exception as err:  # noqa: BLE001  (the rest must still come off)
                self.patches.notes.append(f"{rec.name}: remove failed: {err}")
        self.scope.remove()
        self.steps.remove()
        self.backward.remove()
        self.snapshots.remove()
        self.patches.restore()
        self.scope.after_restore()
        if self._prev_thread_profile is None and threading.getprofile() is _attach_new_thread:
            threading.setprofile(None)

    def stop(self, exc: BaseException | None = None) -> None:
        """Remove every hook, drain the native log and assemble what Run.from_session reads."""
        global _active
        if self.forked_away:   # the hooks came off at the fork (_leave_forked_child)
            return
        if self.outer is not None:
            try:
                self._stop_nested(exc)
            finally:
                with _start_lock:   # (read under it by another thread's start)
                    open_here = self.outer.nested_threads
                    if open_here.get(self._nested_thread):
                        open_here[self._nested_thread] -= 1
                        if not open_here[self._nested_thread]:
                            del open_here[self._nested_thread]
            return
        still_open = [t.name for t, n in list(self.nested_threads.items())
                      if n and t is not threading.current_thread()]
        if still_open:   # memprof run's block ends when the script's main code returns
            _warn(lambda: warnings.warn(
                f"memprof: thread {still_open[0]!r} still has a memprof.track() block open "
                "as the run ends (the script's main code returned without joining it): that "
                "block can record nothing more; join the thread before the script ends",
                RuntimeWarning, stacklevel=5))
        self.stopped = True
        try:
            self.auto_steps.check()   # a hand-written loop's last update ends its last step
            self.snapshots.final()
        finally:
            try:
                self.auto_steps.close()
                self.snapshots.release()
                self._uninstall()
            finally:  # the native hook goes off whatever happened above
                warning = _C.stop()
                _active = None
        if warning:
            _warn(lambda: warnings.warn(warning, RuntimeWarning, stacklevel=5))
        # time-ordered and split natively (the analysed device's memory events apart from
        # the rest), with room in front for the pre-existing blocks; the native log is freed
        # as it is copied, so leaving a block holds the event bytes once
        memory, side, side_position, device = _C.take_events(
            [int(b[2]) for b in self.snapshots.baseline])
        streams = EventStreams(memory=memory.view(EVENT_DTYPE), side=side.view(EVENT_DTYPE),
                               side_position=side_position, device_type=int(device))
        fill_baseline(streams, self.snapshots.baseline)
        self._assemble(streams, self, exc)
        self.records = {rec.name: rec.record() for rec in self.recorders}
        if self.snapshots.looks:   # (its time is memprof's: profile_schema.PAUSES)
            self.records["parameter_looks"] = {"looks": list(self.snapshots.looks)}

    def _lend_recorders(self, outer: "Session") -> None:
        """A nested block's recorders that the outer block lacks (its health=True inside
        `memprof run`, whose block records none) record on the outer's hooks from here on, to
        the outer's end: the inner block's health was None (a script reading it failed only
        under memprof run), and the outer's profile has it from here."""
        have = {rec.name for rec in outer.recorders}
        for rec in self.recorders:
            if rec.name not in have:
                rec.install(outer)
                outer.recorders.append(rec)
                self._lent.add(rec.name)

    def _stop_nested(self, exc) -> None:
        base = self._baseline_in_outer_ids()
        if self.outer.stopped:   # its log was taken: nothing of this block is left to read
            _warn(lambda: warnings.warn(
                "memprof.track: the block this one nested in (memprof run's) ended first, "
                f"when the script's main code returned; thread {self._nested_thread.name!r} "
                "was not joined, so its block's events are gone (its profile is empty): join "
                "it before the script ends", RuntimeWarning, stacklevel=6))
            raw, order = np.zeros(0, dtype=EVENT_DTYPE), np.zeros(0, dtype=np.int64)
        else:
            # threads interleave in the log: keep what came after our marker, in time order
            raw = np.frombuffer(_C.events(), dtype=EVENT_DTYPE)
            label = _C.strings().index(self._nested_label)
            order = np.argsort(raw["t_ns"], kind="stable")
            start = np.flatnonzero((raw["kind"][order] == KIND_MARK)
                                   & (raw["op"][order] == label))
            order = order[int(start[0]) + 1:]
        events = behind_baseline(raw, order, base)
        self._assemble(EventStreams.split(events), self.outer, exc, base)
        # the records of the recorders this block lent (they began with it) and, where it
        # asked for health that the outer block records too, the outer's (its steps are the
        # outer's). Not the others': the outer's leak looks and CUDA timeline span steps
        # before this block (its own analyses read its slice of the markers instead)
        wanted = self._lent | ({"health"} & {rec.name for rec in self.recorders})
        self.records = {}
        for rec in self.outer.recorders:
            if getattr(rec, "record_nested", None) is not None:   # its look, for this block
                self.records[rec.name] = rec.record_nested(self)
            elif rec.name in wanted:
                flush = getattr(rec, "flush", None)   # values still held on the device
                if flush is not None:
                    try:
                        flush()
                    except Exception:  # noqa: BLE001  (its record says what it has)
                        pass
                self.records[rec.name] = rec.record()
            elif rec.name == "throughput":
                # this block's batch size (the outer's timeline is not its own) and the
                # DataLoader workers seen so far
                self.records["throughput"] = {
                    "batch_override": self.batch_size,
                    "loader_workers": getattr(rec, "loader_workers", 0)}

    def _baseline_in_outer_ids(self) -> list[tuple]:
        """This nested block's baseline with each module id as the outer session names it
        (the events carry the outer's ids: its hooks recorded them)."""
        to_outer = {}
        for model in self.scope.root_modules():
            for m in model.modules():
                mid = self.scope.module_id(m)
                if mid is not None:
                    outer = self.outer.scope.module_id(m)
                    to_outer[mid] = -1 if outer is None else outer
        return [(ptr, size, dev, to_outer.get(mid, -1), cat)
                for ptr, size, dev, mid, cat in self.snapshots.baseline]

    def so_far(self) -> "SessionSoFar":
        """What stop() assembles, made from a copy of what was recorded so far while the
        session goes on recording (an autosave): the native log is read, not taken, and no
        hook comes off. An outermost session's only."""
        if self.outer is not None or self.forked_away or _active is not self:
            raise RuntimeError("so_far: only the recording, outermost session can be read")
        raw = np.frombuffer(_C.events(), dtype=EVENT_DTYPE)
        events = behind_baseline(raw, np.argsort(raw["t_ns"], kind="stable"),
                                  self.snapshots.baseline)
        del raw
        view = SessionSoFar(self)
        streams = EventStreams.split(events)
        del events
        # what stop() notes at the end (final()), read before _assemble takes the module
        # names, as stop() does: a list beside first read "not trained" here is named here
        # (an EMA started after a warm-up), and a later read of the names has it
        at_end = self.snapshots.at_end()
        self._assemble(streams, self, None, into=view)
        view.snapshot_list += [Snapshot(streams.size, *noted) for noted in at_end]
        view.records = {rec.name: rec.record() for rec in self.recorders}
        if self.snapshots.looks:
            view.records["parameter_looks"] = {"looks": list(self.snapshots.looks)}
        return view

    def _assemble(self, streams: EventStreams, src: "Session", exc,
                  base: list | None = None, into=None) -> None:
        """`streams`: the session's events, the blocks that existed before tracking first
        (`base`: those blocks, the session's own baseline unless given); `into`: where the
        parts go (a SessionSoFar) instead of this session."""
        out = self if into is None else into
        strings = list(_C.strings())
        base = src.snapshots.baseline if base is None else base
        snaps = []
        trains = self.snapshots.baseline_trainable   # (the base is this block's own)
        for cat in sorted({c for *_, c in base}):   # categories of pre-existing blocks
            owned = [(int(p), int(m)) for p, _, _, m, c in base if c == cat]
            snaps.append(Snapshot(marker=len(base), category=int(cat),
                                  ptrs=[p for p, _ in owned], modules=[m for _, m in owned],
                                  trainable=[trains.get(p, 1) for p, _ in owned]
                                  if cat == CAT_PARAMETERS else None))
        label_updates(streams, strings)   # a hand-written update is the optimizer phase
        side = streams.side
        mark_idx = streams.side_index()[(side["kind"] == KIND_MARK) & np.isin(
            side["op"], [i for i, s in enumerate(strings) if s == "snapshot"])]
        taken = src.snapshots.taken
        # a nested block owns the last snapshots; past the marker cap the first are kept
        own = taken[len(taken) - len(mark_idx):] if src is not self else taken[:len(mark_idx)]
        if len(own) == len(mark_idx):
            snaps += [Snapshot(int(i), *noted) for noted, i in zip(own, mark_idx)]
        counters = _C.counters()
        roots = src.scope.root_modules()
        if len(roots) > 1:
            trained = src.steps.trained
            roots = sorted(roots, key=lambda m: not any(id(p) in trained
                                                        for p in m.parameters()))
        out.meta = {
            "t0_ns": _first_time(streams),
            "dropped": int(counters["dropped"]),
            "markers_dropped": int(counters["markers_dropped"]),
            "seq_records_dropped": int(counters["seq_records_dropped"]),
            "capacity": src.capacity,
            "threads": int(counters["threads"]),
            "torch": torch.__version__,
            # the user's class, also behind torch.compile's wrapper; of several models called
            # apart, the one trained (a student, not its teacher)
            "model_class": class_name(roots[0]) if roots else src.scope.first_root_class(),
            # the names given to models and lists beside the model (beside_names.py): the
            # module trees' roots of their own, not the model's children
            "beside_modules": sorted(src.scope.beside_labels()),
            # how modules were named: track(model)'s, as they ran (memprof run), or not at all
            "modules_named": "model" if src.scope.model is not None else (
                "as they ran" if src.scope.auto else "none"),
            # module calls stepped aside under torch.compile, or compiled code ran (a function
            # compiled before the block: its trace had no module call of ours to replay)
            "compiled": src.scope.compiled or ran_compiled_code(strings),
            "steps_marked": src.steps.step,
            # what ended a step (track(step_on=), --step-on): the reports' "optimizer step"
            # is that only in "auto" and "optimizer"
            "step_on": src.steps.step_on,
            "pid": os.getpid(),
            "patch_notes": list(src.patches.notes),
        }
        if exc is not None:
            # sys.exit's value as written (sys.exit(True), sys.exit('msg')): str() lost which
            what = repr(exc.code) if isinstance(exc, SystemExit) else str(exc)
            out.meta["error"] = f"{type(exc).__name__}: {what}".splitlines()[0][:500]
        if into is None and (counters["dropped"] or counters["markers_dropped"]):
            _warn_at_block(f"memprof dropped {counters['dropped']} events and "
                           f"{counters['markers_dropped']} markers after reaching "
                           f"capacity={src.capacity}; raise {src.capacity_knob}", src.frame)
        out.streams = streams
        out.strings = strings
        out.seq_records = _C.seq_records().view(SEQ_DTYPE)   # a fresh array: no copy
        out.snapshot_list = snaps
        out.module_names = src.scope.final_names()

    def __enter__(self) -> "Session":
        self.start(sys._getframe(1))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.stop(exc)
        return False


class SessionSoFar:
    """A recording session as Run.from_session reads it, with the parts stop() assembles
    made from copies of what was recorded so far (Session.so_far); the rest (steps, backward
    calls, logs, the live context) is the session's own, read as it is now."""
    outer = None

    def __init__(self, session: Session):
        self._session = session

    def __getattr__(self, name: str):
        return getattr(self._session, name)


#: the name of the frame dynamo records around each run of the code it compiled
COMPILED_REGION = "Torch-Compiled Region"


def ran_compiled_code(strings: list[str]) -> bool:
    """Whether code torch.compile compiled ran while recording (its frames' names are among
    the op names)."""
    return any(s.startswith(COMPILED_REGION) for s in strings)


def _first_time(streams: EventStreams) -> int:
    """Time of the stream's first event (the pre-existing blocks carry the first real one)."""
    first = [int(a["t_ns"][0]) for a in (streams.memory, streams.side) if a.size]
    return min(first) if first else 0


def _check_may_nest(active: Session) -> None:
    """One session records the whole process (the native log is global): a block may nest in
    the thread that is recording, another thread's block is refused rather than mixed in.
    Under `memprof run` the recording thread is the one in which a block of the script's is
    open, if any: a script whose training thread tracks itself runs as it does under python
    (where that thread's block would be the only one), and a second thread's block is refused
    as python alone would refuse it."""
    here = threading.current_thread()
    holder = active.thread
    if active.nests_any_thread:
        others = [t for t, n in list(active.nested_threads.items()) if n and t is not here]
        holder = others[0] if others else here
    if holder is not None and holder is not here:
        raise RuntimeError(
            f"memprof.track: thread {here.name!r} cannot start a block while thread "
            f"{holder.name!r} is recording (one recording per process, and it already "
            f"sees this thread's allocations); nest the block in {holder.name!r} or "
            "start it after that block has ended")


def _name_torch_profiler_conflict(patches: PatchRegistry) -> None:
    """torch.profiler started inside the block fails in PyTorch ("Profiler is already enabled
    on this thread"): the slot it wants is memprof's allocation hook. Say so."""
    import torch.autograd.profiler as autograd_profiler

    def make(original):
        def _enable_profiler(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            except RuntimeError as err:
                if "already enabled" not in str(err) or not _C.is_active():
                    raise
                raise RuntimeError(
                    "torch.profiler cannot start inside a memprof.track() block: PyTorch "
                    "reports allocations to one profiler at a time and memprof holds that slot "
                    "while it records; run torch.profiler outside the block") from err
        return _enable_profiler
    patches.patch(autograd_profiler, "_enable_profiler", make)


def _attach_new_thread(frame, event, arg):
    """threading.setprofile hook: runs once in each new thread, attaches it, then steps aside."""
    sys.setprofile(None)
    _C.attach_thread()
