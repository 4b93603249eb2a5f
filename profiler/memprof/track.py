"""`memprof.track()`: record every allocation of a block of training code.

Installs the native hooks plus a few Python hooks (module scope, optimizer step, new threads)
and removes every one of them on exit, also when the body raises; then builds a `Profile`
from what was recorded, saving it first if the body raised (an OOM must not lose the story).
"""
from __future__ import annotations

import os
import sys
import threading
import time
import warnings
import weakref
from typing import Callable, Iterable

import numpy as np
import torch
from torch._subclasses.fake_tensor import is_fake

from . import _C
from .events import (EVENT_DTYPE, PHASE_FORWARD, PHASE_OPTIMIZER, PHASE_OTHER, SEQ_DTYPE,
                     KIND_MARK, KIND_MEMORY)
from .graph import remove_handles
from .profile import (CAT_GRADIENTS, CAT_OPTIMIZER_STATE, CAT_PARAMETERS, Profile, Snapshot,
                      PREEXISTING_THREAD)

DEFAULT_CAPACITY = 20_000_000  # events (80 B each: 1.6 GB at most); excess is counted as dropped

_active: "Tracker | None" = None


FAKE_DEVICE_TYPE = 1  # storages of fake tensors stand for the GPU an estimate models


def _storage_key(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(address, nbytes, device_type) of a tensor's storage; None for storage-less tensors.

    A fake tensor's storage has no address: the identity of its Python storage object stands
    in for it (PyTorch keeps one storage object per StorageImpl alive), which is also the key
    memprof.estimate records its allocations under."""
    try:
        if is_fake(t):
            st = t.untyped_storage()
            return id(st), st.nbytes(), FAKE_DEVICE_TYPE
        st = t.untyped_storage()
        ptr = st.data_ptr()
    except Exception:  # noqa: BLE001  (meta or otherwise storage-less tensors)
        return None
    if ptr == 0:
        return None
    return ptr, st.nbytes(), (1 if t.is_cuda else 0)


class Tracker:
    """The context manager behind memprof.track(); see that function."""

    def __init__(self, model: torch.nn.Module | None = None, optimizer=None, *,
                 path: str | None = None, capacity: int = DEFAULT_CAPACITY,
                 analyses: Iterable[Callable] | None = None, auto_modules: bool = False,
                 health: bool = False, batch_size: int | None = None):
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module or None, got "
                            f"{type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer or None, got "
                            f"{type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.path = path
        self.capacity = int(capacity)
        self.profile: Profile | None = None
        self._handles: list = []
        self._snapshots: list[Snapshot] = []
        self._optimizers: "weakref.WeakSet" = weakref.WeakSet()
        self._step = 0
        self._prev_thread_profile = None
        self._outer: Tracker | None = None
        self._nested_label = ""
        self._analyses = list(analyses) if analyses is not None else None
        self.auto_modules = auto_modules
        # (prefix, namespace dict) pairs searched for holders of leaked tensors, besides the
        # model and the frame that entered the block ("" prefix: names stand alone)
        self.roots: list[tuple[str, dict]] = []
        self._auto_ids: dict[int, int] = {}
        self._auto_stack: list[int] = []
        self._auto_roots: list[torch.nn.Module] = []
        self._frame = None
        self._step_seqs: list[int] = []
        self._backward = None
        self._module_names: list[str] = []
        self._param_module: dict[int, int] = {}
        self._t0 = 0
        # --- throughput / training health (memprof.throughput, memprof.health)
        if batch_size is not None and (isinstance(batch_size, bool)
                                       or not isinstance(batch_size, int) or batch_size <= 0):
            raise ValueError(f"batch_size: expected a positive int or None, got {batch_size!r}")
        self.health_enabled = bool(health)
        self.batch_size = batch_size
        self._throughput = None
        self._health = None
        self._logs: list[tuple[int, str, float]] = []

    # ------------------------------------------------------------------ public helpers
    def step(self) -> None:
        """Mark a step boundary, for loops that do not call an optimizer."""
        self._end_step()

    def log(self, **values) -> None:
        """Record numbers for the current optimizer step, e.g. prof.log(loss=loss.item());
        `loss` feeds the training-health checks (pass a float: a tensor costs a sync)."""
        from .health import log_values
        log_values(self._outer or self, values)

    @property
    def throughput(self) -> dict:
        """Step time, phases, samples/s, micro-steps (memprof.throughput.summarize)."""
        if self.profile is None:
            raise RuntimeError("throughput: available once the track() block has exited")
        from .throughput import summarize
        return summarize(self.profile)

    @property
    def health(self) -> dict | None:
        """Training health (memprof.health.summarize); None without health=True or log()."""
        if self.profile is None:
            raise RuntimeError("health: available once the track() block has exited")
        from .health import summarize
        return summarize(self.profile)

    def __getattr__(self, name):
        # After exit, the tracker stands for its profile: prof.peak, prof.report(), ...
        profile = self.__dict__.get("profile")
        if profile is not None:
            return getattr(profile, name)
        raise AttributeError(f"{name!r}: the profile is available once the track() block has "
                             "exited" if name in dir(Profile) else name)

    # ------------------------------------------------------------------ context protocol
    def __enter__(self) -> "Tracker":
        global _active
        if _active is not None:
            # Nested block: share the outer session, keep our own slice of its events.
            self._outer = _active
            self._nested_label = f"nested_start:{id(self)}"
            _C.mark(self._nested_label, 0)
            return self
        self._t0 = time.monotonic_ns()
        self._frame = sys._getframe(1)  # the code running the block: roots for holder search
        self._collect_baseline()
        _C.start(self.capacity)
        self._step_seqs = [int(_C.peek_sequence_nr())]
        _active = self
        try:
            self._install_hooks()
        except BaseException:
            self._remove_hooks()
            _C.stop()
            _active = None
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        global _active
        if self._outer is not None:
            # threads interleave in the log: keep what came after our marker, in time order
            raw = np.frombuffer(_C.events(), dtype=EVENT_DTYPE)
            raw = raw[np.argsort(raw["t_ns"], kind="stable")]
            label = _C.strings().index(self._nested_label)
            start = np.flatnonzero((raw["kind"] == KIND_MARK) & (raw["op"] == label))
            self._finish(raw[int(start[0]) + 1:].copy(), exc, nested=True)
            return False
        try:
            self._final_snapshots()
        finally:
            try:
                self._remove_hooks()
            finally:  # the native hook goes off whatever happened above
                warning = _C.stop()
                _active = None
        if warning:
            warnings.warn(warning, RuntimeWarning, stacklevel=2)
        raw = np.frombuffer(_C.events(), dtype=EVENT_DTYPE)  # a fresh writable array: no copy
        self._finish(raw, exc)
        return False  # never swallow the user's exception

    # ------------------------------------------------------------------ setup
    def _collect_baseline(self) -> None:
        """Blocks alive before tracking that memprof can name: parameters, gradients, state."""
        self._baseline: list[tuple[int, int, int, int, int]] = []  # ptr, size, dev, module, cat
        seen: set[int] = set()
        names: list[str] = []
        if self.model is not None:
            for mid, (name, mod) in enumerate(self.model.named_modules(remove_duplicate=True)):
                names.append(name)
                for p in mod.parameters(recurse=False):
                    self._param_module.setdefault(id(p), mid)
        self._module_names = names

        def add(t, cat, module):
            key = _storage_key(t)
            if key is None or key[0] in seen:
                return
            seen.add(key[0])
            self._baseline.append((key[0], key[1], key[2], module, cat))

        for p in self._all_params():
            mid = self._param_module.get(id(p), -1)
            add(p, CAT_PARAMETERS, mid)
            if p.grad is not None:
                add(p.grad, CAT_GRADIENTS, mid)
        if self.optimizer is not None:
            for p, state in self.optimizer.state.items():
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        add(v, CAT_OPTIMIZER_STATE, self._param_module.get(id(p), -1))

    def _all_params(self) -> list[torch.Tensor]:
        params: dict[int, torch.Tensor] = {}
        for model in ([self.model] if self.model is not None else []) + self._auto_roots:
            for p in model.parameters():
                params[id(p)] = p
        for opt in ([self.optimizer] if self.optimizer is not None else []) + \
                list(self._optimizers):
            for g in opt.param_groups:
                for p in g["params"]:
                    params[id(p)] = p
        return list(params.values())

    def _install_hooks(self) -> None:
        if self.model is not None:
            modules = list(self.model.named_modules(remove_duplicate=True))
            for mid, (_, mod) in enumerate(modules):
                self._handles.append(mod.register_forward_pre_hook(self._make_pre_hook(mid)))
                self._handles.append(mod.register_forward_hook(self._make_post_hook(mid),
                                                               always_call=True))
        elif self.auto_modules:
            from torch.nn.modules.module import (register_module_forward_hook,
                                                 register_module_forward_pre_hook)
            self._handles.append(register_module_forward_pre_hook(self._auto_pre))
            self._handles.append(register_module_forward_hook(self._auto_post, always_call=True))
        from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                           register_optimizer_step_pre_hook)
        self._handles.append(register_optimizer_step_pre_hook(self._on_optimizer_pre))
        self._handles.append(register_optimizer_step_post_hook(self._on_optimizer_post))
        from .graph import BackwardRecorder
        self._backward = BackwardRecorder(self)
        self._backward.install()
        # --- throughput / training health; installed before the thread hook below so that
        # the GPU sampler thread is not recorded
        from .throughput import ThroughputRecorder
        self._throughput = ThroughputRecorder(self)
        self._throughput.install()
        if self.health_enabled:
            from .health import HealthRecorder
            self._health = HealthRecorder(self)
            self._health.install()
        # Threads started while tracking (DataLoader pin-memory thread, thread pools) record too.
        self._prev_thread_profile = threading.getprofile()
        if self._prev_thread_profile is None:
            threading.setprofile(_attach_new_thread)

    def _remove_hooks(self) -> None:
        for rec in (self._health, self._throughput):  # reverse install order (they wrap)
            if rec is not None:
                rec.remove()
        remove_handles(self._handles)
        if self._backward is not None:
            self._backward.remove()
        if self._prev_thread_profile is None and threading.getprofile() is _attach_new_thread:
            threading.setprofile(None)

    def _enter_module(self, mid: int, root: bool) -> None:
        if root and not torch._C._current_autograd_node():
            _C.set_phase(PHASE_FORWARD)
            self._mark("forward_start", self._step)
        _C.push_module(mid)

    def _exit_module(self, root: bool) -> None:
        _C.pop_module()
        if root and _C.get_phase() == PHASE_FORWARD:
            _C.set_phase(PHASE_OTHER)
            self._mark("forward_end", self._step)

    def _make_pre_hook(self, mid: int):
        def pre(module, args):
            self._enter_module(mid, mid == 0)
        return pre

    def _make_post_hook(self, mid: int):
        def post(module, args, output):
            self._exit_module(mid == 0)
        return post

    # ------------------------------------------------------------------ modules found on the fly
    def _auto_pre(self, module, args) -> None:
        """Global module hook (no model given): the outermost module called is a root."""
        mid = self._auto_ids.get(id(module))
        if mid is None:
            if not self._auto_stack:
                prefix = "" if not self._auto_roots else f"{type(module).__name__}"
                self._auto_roots.append(module)
                for name, sub in module.named_modules(remove_duplicate=True):
                    full = ".".join(x for x in (prefix, name) if x)
                    self._auto_ids.setdefault(id(sub), len(self._module_names))
                    self._module_names.append(full)
                    for p in sub.parameters(recurse=False):
                        self._param_module.setdefault(id(p), self._auto_ids[id(sub)])
            else:
                parent = self._module_names[self._auto_stack[-1]]
                self._auto_ids[id(module)] = len(self._module_names)
                self._module_names.append(f"{parent}.<{type(module).__name__}>")
            mid = self._auto_ids[id(module)]
        root = not self._auto_stack
        self._auto_stack.append(mid)
        self._enter_module(mid, root)

    def _auto_post(self, module, args, output) -> None:
        if self._auto_stack:
            self._auto_stack.pop()
            self._exit_module(not self._auto_stack)

    # ------------------------------------------------------------------ optimizer / step hooks
    def _watches(self, optimizer) -> bool:
        return self.optimizer is None or optimizer is self.optimizer

    def _on_optimizer_pre(self, optimizer, args, kwargs) -> None:
        if not self._watches(optimizer):
            return
        self._optimizers.add(optimizer)
        self._mark("optimizer_start", self._step)
        self._snapshot(CAT_GRADIENTS, [(p.grad, p) for g in optimizer.param_groups
                                       for p in g["params"] if p.grad is not None])
        _C.set_phase(PHASE_OPTIMIZER)

    def _on_optimizer_post(self, optimizer, args, kwargs) -> None:
        if not self._watches(optimizer):
            return
        self._snapshot(CAT_OPTIMIZER_STATE, _state_pairs(optimizer))
        _C.set_phase(PHASE_OTHER)
        self._end_step()

    def _end_step(self) -> None:
        if self._outer is not None:
            self._outer._end_step()
            return
        self._mark("step", self._step)
        self._step += 1
        self._step_seqs.append(int(_C.peek_sequence_nr()))
        _C.set_step(self._step)

    def _mark(self, label: str, value: int = 0) -> None:
        _C.mark(label, int(value))

    def _snapshot(self, category: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Remember which storages hold `category` now; pairs are (tensor, its parameter)."""
        owner: dict[int, int] = {}
        for t, p in pairs:
            key = _storage_key(t)
            if key is not None:
                owner.setdefault(key[0], self._param_module.get(id(p), -1))
        ptrs = sorted(owner)
        # The marker's event index is found after the run (markers are events of their own).
        _C.mark("snapshot", category)
        self._snapshots.append(Snapshot(marker=-1, category=category, ptrs=ptrs,
                                        modules=[owner[q] for q in ptrs]))

    def _final_snapshots(self) -> None:
        params = self._all_params()
        self._snapshot(CAT_PARAMETERS, [(p, p) for p in params])
        self._snapshot(CAT_GRADIENTS, [(p.grad, p) for p in params if p.grad is not None])
        states = []
        for opt in ([self.optimizer] if self.optimizer is not None else list(self._optimizers)):
            states += _state_pairs(opt)
        self._snapshot(CAT_OPTIMIZER_STATE, states)

    # ------------------------------------------------------------------ building the profile
    def _finish(self, raw: np.ndarray, exc: BaseException | None, nested: bool = False) -> None:
        strings = list(_C.strings())
        src = self._outer if nested else self
        base = src._baseline
        pre = np.zeros(len(base), dtype=EVENT_DTYPE)
        if base:
            arr = np.array(base, dtype=np.int64)
            pre["ptr"] = arr[:, 0].astype(np.uint64)
            pre["size"] = arr[:, 1]
            pre["device_type"] = arr[:, 2]
            pre["module"] = arr[:, 3]
            pre["t_ns"] = raw["t_ns"].min() if raw.size else 0
            for f in ("op", "leaf_op", "node", "seq"):
                pre[f] = -1
            pre["thread"] = PREEXISTING_THREAD
            pre["kind"] = KIND_MEMORY
        # Threads interleave: order all events by time (stable: a thread's order is kept).
        order = np.argsort(raw["t_ns"], kind="stable")
        events = np.concatenate([pre, raw[order]])
        # Snapshot categories for pre-existing blocks and the markers' positions.
        snaps = []
        for cat in sorted({c for *_, c in base}):
            owned = [(int(p), int(m)) for p, _, _, m, c in base if c == cat]
            snaps.append(Snapshot(marker=len(base), category=int(cat),
                                  ptrs=[p for p, _ in owned], modules=[m for _, m in owned]))
        mark_idx = np.flatnonzero((events["kind"] == KIND_MARK) & np.isin(
            events["op"], [i for i, s in enumerate(strings) if s == "snapshot"]))
        own = src._snapshots[len(src._snapshots) - len(mark_idx):] if nested else src._snapshots
        if len(own) == len(mark_idx):
            for s, i in zip(own, mark_idx):
                snaps.append(Snapshot(marker=int(i), category=s.category, ptrs=s.ptrs,
                                      modules=s.modules))
        counters = _C.counters()
        meta = {
            "t0_ns": int(events["t_ns"].min()) if events.size else 0,
            "dropped": int(counters["dropped"]),
            "capacity": self.capacity,
            "threads": int(counters["threads"]),
            "torch": torch.__version__,
            "model_class": (type(src.model).__name__ if src.model is not None
                            else type(src._auto_roots[0]).__name__ if src._auto_roots
                            else None),
            "steps_marked": src._step,
            "pid": os.getpid(),
        }
        if exc is not None:
            meta["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        if counters["dropped"]:
            warnings.warn(f"memprof dropped {counters['dropped']} events after reaching "
                          f"capacity={self.capacity}; raise track(capacity=...)", RuntimeWarning)
        seqs = np.frombuffer(_C.seq_records(), dtype=SEQ_DTYPE).copy()
        self.profile = Profile(events, strings, src._module_names, seqs, snaps, meta)
        if not nested:
            self._run_analyses(exc)
        target = self.path
        if target is None and exc is not None and not nested:
            target = f"memprof-{os.getpid()}-{int(time.time())}.memprof"
        if target is not None:
            try:
                self.profile.save(target)
                if exc is not None:
                    print(f"memprof: the tracked code raised {type(exc).__name__}; profile saved "
                          f"to {target}", file=sys.stderr)
            except OSError as err:
                print(f"memprof: could not save the profile to {target}: {err}", file=sys.stderr)

    def _run_analyses(self, exc) -> None:
        from .analyses import default_analyses
        for analysis in (self._analyses if self._analyses is not None else default_analyses()):
            try:
                self.profile.findings.extend(analysis(self.profile, self))
            except Exception as err:  # noqa: BLE001  (an analysis must never break training)
                self.profile.meta.setdefault("analysis_errors", []).append(
                    f"{getattr(analysis, '__name__', analysis)} could not check: "
                    f"{type(err).__name__}: {err}")
        from .analyses import sort_findings
        self.profile.findings[:] = sort_findings(self.profile.findings)
        self._frame = None  # don't keep the user's frame (and its locals) alive


def _state_pairs(optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(v, p) for p, st in optimizer.state.items() for v in st.values()
            if isinstance(v, torch.Tensor)]


def _attach_new_thread(frame, event, arg):
    """threading.setprofile hook: runs once in each new thread, attaches it, then steps aside."""
    sys.setprofile(None)
    _C.attach_thread()


def track(model: torch.nn.Module | None = None, optimizer=None, *, path: str | None = None,
          capacity: int = DEFAULT_CAPACITY, analyses=None, auto_modules: bool = False,
          health: bool = False, batch_size: int | None = None) -> Tracker:
    """Record every allocation and free made inside the block.

    model: attributes allocations to its submodules (forward hooks) and names parameters.
    optimizer: restrict step detection to this optimizer (default: any optimizer's step).
    path: save the profile there on exit (also when the block raises; then a default path is
    used if none is given). After the block, the returned object answers like a Profile.
    auto_modules: without a model, attribute to whatever modules run (global module hooks;
    what `memprof run` uses on an unmodified script).
    health: also record training health (grad norm before/after clipping, LR per step, LR
    scheduler order, loss spikes, non-finite values); see memprof.health.
    batch_size: samples per micro-step for samples/s (default: the leading dimension of the
    root module's first input); see memprof.throughput.
    """
    return Tracker(model, optimizer, path=path, capacity=capacity, analyses=analyses,
                   auto_modules=auto_modules, health=health, batch_size=batch_size)
