"""What the framework callbacks share: the run's tracker, where it is saved, and the live peak
that the framework's own logging receives."""
from __future__ import annotations

import atexit
import functools
import importlib
import inspect
import os
import sys
import weakref

import numpy as np
import torch

from .. import _C
from ..record.distributed import identity, rank_path
from ..record.events import EVENT_DTYPE, KIND_MEMORY
from ..record.steps import torch_optimizer
from ..track import Tracker

PEAK_KEY = "memprof/peak_bytes"


def require(module: str, package: str, integration: str):
    """Import `module` or raise a one-line ImportError naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"memprof.integrations.{integration} needs {package}: "
                          f"pip install {package}") from None


def profile_path(output_dir: str, name: str) -> str:
    """`<dir>/<name>.memprof`, or `<name>.rank<R>.memprof` in a distributed job - the rank as
    memprof.track() names its file (record.distributed: the process group, else torchrun's
    environment, so a callback started before init_process_group names the same file); a
    later run in the same directory gets `<name>-1...`, never overwriting an earlier run's."""
    os.makedirs(output_dir, exist_ok=True)
    job = identity()

    def candidate(stem: str) -> str:
        path = os.path.join(output_dir, stem + ".memprof")
        return rank_path(path, int(job["rank"])) if job is not None else path

    path, n = candidate(name), 0
    while os.path.exists(path):
        n += 1
        path = candidate(f"{name}-{n}")
    return path


def unwrap_optimizer(optimizer):
    """The torch optimizer a framework's optimizer object wraps (see torch_optimizer), or None
    when it is not one."""
    optimizer = torch_optimizer(optimizer)
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


class LivePeak:
    """Peak of live bytes since the previous call, while recording. On CUDA the caching
    allocator's own peak counter (cheap); on the CPU the records memprof's event log gained
    since the previous call, kept as running figures: the live bytes, the blocks alive, and a
    cursor per recording thread (each thread's log only grows, so its first `seen` records
    were handled before). A call copies and handles only its new records
    (`_C.events(since=cursors)`), so a long run costs each logged step what it recorded."""

    def __init__(self, tracker: Tracker, device: torch.device | None):
        self.cuda = device is not None and device.type == "cuda"
        self.device = device
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            return
        base = tracker.session.snapshots.baseline   # blocks alive when tracking started
        self.blocks = {int(ptr): int(size) for ptr, size, dev, _, _ in base
                       if dev == _C.DEVICE_CPU}
        self.live = sum(self.blocks.values())
        self.seen: dict[int, int] = {}   # records of each thread's log handled so far
        if tracker.session.outer is not None:
            # a block nested in another (the callback in a script under `memprof run`): the
            # log holds the outer block's records too, and the blocks they made are in this
            # block's baseline already: start past them
            self._unseen()

    def __call__(self) -> int:
        if self.cuda:
            peak = int(torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
            return peak
        ev = self._unseen()
        ev = ev[(ev["kind"] == KIND_MEMORY) & (ev["device_type"] == _C.DEVICE_CPU)]
        if not ev.size:
            return self.live
        ev = ev[np.argsort(ev["t_ns"], kind="stable")]
        delta = self._deltas(ev["ptr"], ev["size"])
        trace = self.live + np.cumsum(delta)
        peak, self.live = max(self.live, int(trace.max())), int(trace[-1])
        return peak

    def _unseen(self) -> np.ndarray:
        """The records no earlier call handled, and the cursors moved past them (a record's
        `thread` is its log's index, the order the native drain lays the logs out in)."""
        since = [self.seen.get(i, 0) for i in range(max(self.seen) + 1)] if self.seen else []
        log = np.frombuffer(_C.events(since), dtype=EVENT_DTYPE)
        if log.size:
            threads, counts = np.unique(log["thread"], return_counts=True)
            for tid, n in zip(threads.tolist(), counts.tolist()):
                self.seen[tid] = self.seen.get(tid, 0) + n
        return log

    def _deltas(self, ptr: np.ndarray, size: np.ndarray) -> np.ndarray:
        """Signed bytes per event, vectorised: a free counts when its block is known (allocated
        earlier in these events, or alive in `self.blocks`); frees of blocks allocated before
        tracking that memprof did not know count 0. `self.blocks` is kept up to date."""
        order = np.argsort(ptr, kind="stable")            # by address, then by time
        ps, ss = ptr[order], size[order]
        pair = (ps[1:] == ps[:-1]) & (ss[:-1] > 0) & (ss[1:] < 0)
        freed_here = np.zeros(ptr.size, dtype=bool)
        freed_here[order[1:][pair]] = True
        alloc_freed = np.zeros(ptr.size, dtype=bool)
        alloc_freed[order[:-1][pair]] = True
        delta = np.where(size > 0, size, 0)
        delta[freed_here] = size[freed_here]
        blocks = self.blocks
        for i in np.flatnonzero((size < 0) & ~freed_here).tolist():   # older blocks: few
            delta[i] = -blocks.pop(int(ptr[i]), 0)
        kept = (size > 0) & ~alloc_freed
        blocks.update(zip(ptr[kept].tolist(), size[kept].tolist()))
        return delta


def check_track_options(options: dict) -> dict:
    """memprof.track()'s own checks of the callback's options, when the callback is made: it
    is made before the model, the data and the framework load, and a bad option failed only
    when training began. Returns the options as every run reads them: `analyses` as the list
    track() made of it (a generator is read once: the check read it to its end)."""
    known = [n for n in inspect.signature(Tracker).parameters
             if n not in ("model", "optimizer", "path")]
    for name in options:
        if name not in known:
            raise TypeError(f"MemprofCallback: {name}={options[name]!r} is no option of "
                            f"memprof.track; expected some of: {', '.join(known)}")
    checked = Tracker(None, None, **options)   # (a block only begins when it is entered)
    return dict(options, analyses=checked.analyses) if "analyses" in options else options


class RunTracker:
    """One memprof.track() block per training run, opened and closed by a callback."""

    def __init__(self, output_dir: str, name: str, track_kwargs: dict):
        if "path" in track_kwargs:
            raise TypeError("MemprofCallback: the profile's path is <output_dir>/<name>.memprof;"
                            " pass output_dir= and name= instead of path=")
        track_kwargs = check_track_options(track_kwargs)
        self.output_dir, self.name, self.track_kwargs = str(output_dir), name, track_kwargs
        self.tracker: Tracker | None = None
        self.profile = None          # the last run's Profile, once it ended
        self.path: str | None = None  # where the last run's profile was saved
        self.peak: LivePeak | None = None
        self.first_step = 0
        self._atexit = None
        self._restore: list = []      # undo what forward_method did, at stop

    @property
    def active(self) -> bool:
        return self.tracker is not None

    def start(self, model, optimizer, roots: dict, first_step: int = 0) -> None:
        """first_step: the framework's step count now (a resumed run): log_step() takes the
        framework's step numbers and memprof counts from 0."""
        if self.tracker is not None:   # the previous run raised without telling us
            self.stop(RuntimeError("a new training run began before the previous one ended"))
        model = model if isinstance(model, torch.nn.Module) else None
        self.first_step = int(first_step)
        self.path = profile_path(self.output_dir, self.name)
        tracker = Tracker(model, unwrap_optimizer(optimizer), path=self.path,
                          **self.track_kwargs)
        tracker.__enter__()
        self.tracker = tracker
        # holders of leaked tensors are named from the framework's objects too
        tracker.roots.append(("", {k: v for k, v in roots.items() if v is not None}))
        device = next((p.device for p in model.parameters()), None) if model else None
        self.peak = LivePeak(tracker, device)
        ref = weakref.ref(self)   # a run that raises past the framework still gets saved
        self._atexit = lambda: ref() is not None and ref().stop(_exit_cause())
        atexit.register(self._atexit)

    def forward_method(self, owner, name: str) -> None:
        """While tracking, `owner.<name>(...)` is a forward pass of the model (phase, markers,
        batch size from its arguments): a framework whose step is not the model's forward
        (Lightning's `training_step` calls `self.net(x)`, never the module itself)."""
        session = self.tracker.session
        # a block nested in another (a Trainer script under `memprof run`) records through
        # the outer one's scope: its own was never installed
        scope = (session.outer or session).scope
        inner = getattr(owner, name)

        def method(*args, **kwargs):
            return scope.forward_pass(inner, *args, **kwargs)

        functools.update_wrapper(method, inner)
        owner.__dict__[name] = method   # an instance attribute: the class is untouched
        scope.keep_out_of_copies(owner, name, method)

        def restore():
            if owner.__dict__.get(name) is method:
                del owner.__dict__[name]
            scope.instance_methods.get(id(owner), {}).pop(name, None)
        self._restore.append(restore)

    def log_step(self, step: int, **values) -> None:
        """Values for the framework's step `step` (counted as the framework counts)."""
        step -= self.first_step
        if self.tracker is not None and step >= 0:
            values = {k: float(v) for k, v in values.items() if _number(v)}
            if values:
                self.tracker.log_step(step, **values)

    def step_peak(self) -> int | None:
        return self.peak() if self.tracker is not None and self.peak is not None else None

    def stop(self, exc: BaseException | None = None) -> None:
        tracker, self.tracker, self.peak = self.tracker, None, None
        while self._restore:
            self._restore.pop()()
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None
        if tracker is None:
            return
        if exc is not None:
            try:
                tracker.__exit__(type(exc), exc, exc.__traceback__)
            except Exception as err:  # noqa: BLE001  (never hide the training's own error)
                print(f"memprof: could not finish the profile: {err}", file=sys.stderr)
        else:
            tracker.__exit__(None, None, None)
        self.profile = tracker.profile
        self.path = tracker.saved


def _exit_cause() -> BaseException:
    """Why the process exits while a run is still being recorded: the exception that ended
    the script (Python keeps it in sys.last_value before the exit handlers run), else that
    the process exited."""
    last = getattr(sys, "last_value", None)
    ipython = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)
    interactive = hasattr(sys, "ps1") or ipython() is not None   # (an earlier cell's error)
    if isinstance(last, BaseException) and not interactive:
        return last
    return RuntimeError("the process exited during training (no framework callback ended the "
                        "run)")


def _number(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() == 1
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


class RunAccess:
    """What both callbacks expose about their run (they hold a RunTracker as `self.run`)."""
    run: RunTracker

    @property
    def profile(self):
        """The last run's Profile (None until a run ended)."""
        return self.run.profile

    @property
    def path(self) -> str | None:
        """Where the last (or current) run's profile is saved."""
        return self.run.path
