"""Steps and phases: the optimizer-step hooks, the backward wrapper and manual step marks.

What ends a step is chosen by `step_on` (track(step_on=...), `memprof run --step-on`):
- "auto" (default): `optimizer.step()` of a watched optimizer (every optimizer unless track()
  was given one), or - in a loop with none - a change of the parameters after a backward
  (record.auto_steps); a `GradScaler.step(optimizer)` that skipped the optimizer's step
  (inf/NaN gradients) ends one too, noted as skipped: the iteration is a step, whose work
  was otherwise folded into the next one's (a false "LR changed between micro-steps");
- "optimizer": optimizer steps only; "backward": every backward call (optimizer steps then
  only mark the optimizer phase); "manual": only `prof.step()` (what `--step-on FUNCTION` calls
  when the function returns).
`prof.step()` ends a step in every mode. At each boundary the autograd sequence counter is noted:
the leak check tells from a node's sequence number which step created it. Recorders subscribe
to the optimizer hooks and to backward here instead of installing their own.

The hooks here run once or twice per step, each time with caches that the step's kernels have
emptied: there a Python frame costs several times its warm time, so they call memprof._C
directly, and subscriber lists are walked over a copy, so that a subscriber may unsubscribe
itself once it has nothing left to do.
"""
from __future__ import annotations

import itertools
import sys
import threading
import weakref
from array import array

import torch

from .. import _C
from .events import PHASE_OTHER
from .module_call import break_graph_if_traced, dynamo_compiling, never_compiled, outside_dynamo
from .patches import PatchRegistry, remove_handles


STEP_ON = ("auto", "optimizer", "backward", "manual")
FIRST_LOOK_STEP = 2     # steps ended at on_look_step's first call; then 4, 8, 16, ...


def torch_optimizer(optimizer):
    """The optimizer whose step() torch's optimizer hooks see. accelerate's AcceleratedOptimizer
    and Lightning's LightningOptimizer wrap one (`.optimizer` / `._optimizer`) and step it
    without running the hooks themselves: `track(model, accelerated_optimizer)` watched an
    optimizer whose hooks never ran (no LR or gradient-norm rows). A wrapper whose own step
    runs the hooks (a Lookahead built as an Optimizer subclass) is the one stepped."""
    for _ in range(8):
        cls = type(optimizer)
        if optimizer is None or getattr(getattr(cls, "step", None), "hooked", False) or \
                cls.__module__.startswith("torch.optim"):
            break
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


class StepClock:
    def __init__(self, optimizer=None, step_on: str = "auto"):
        if step_on not in STEP_ON:
            raise ValueError(f"step_on: expected one of {', '.join(STEP_ON)}, got {step_on!r}")
        self.step_on = step_on
        # held weakly: a script that replaces its optimizer (after model.to(torch.float64), a
        # new learning-rate schedule) frees the old one and its state, as without memprof;
        # once it is gone every optimizer's steps count, the new one's too
        optimizer = torch_optimizer(optimizer)
        self._optimizer = None if optimizer is None else weakref.ref(optimizer)
        self.step = 0
        # int64 arrays, 8 bytes per step end (a list of ints took 40: each a new int object)
        self.step_seqs = array("q")      # autograd sequence counter at each boundary
        # per boundary: the label of the optimizer that stepped (1, 2, ... in the order first
        # seen: an id is reused by the next fold's optimizer), or 0 (analyse.turns)
        self.step_owners = array("q")
        self._labels: dict[int, int] = {}         # id(optimizer) -> its label
        self._optimizer_steps = 0                 # boundaries the optimizer hooks ended
        self.skipped: list[int] = []              # steps whose update a GradScaler skipped
        # a forward pass or a backward() call began since the last boundary: a number logged
        # before one is the step that just ended's (`loss.backward(); opt.step();
        # prof.log(loss=...)` put each loss on the next step, the last on a partial one)
        self.began = False
        # watched optimizers seen, id -> weak reference (a dict lookup per step, where a
        # WeakSet.add is a Python call making a new reference each time)
        self._seen: dict[int, weakref.ref] = {}
        # ids of the parameters watched optimizers update, noted when each is first seen:
        # which of several models is trained, also once its optimizer is gone (a script's
        # main() under `memprof run` has returned when the block ends)
        self.trained: set[int] = set()
        # every optimizer seen stepping, watched or not, id -> weak reference, and the ids
        # of the parameters they update (record.untrained_grads reads them at the block's end:
        # a dict lookup per step here, where a hook of its own was a Python call per step)
        self._stepped: dict[int, weakref.ref] = {}
        self.updated: set[int] = set()
        self.on_optimizer_pre: list = []          # fn(optimizer), for every optimizer
        self.on_skipped: list = []                # fn(optimizer), a GradScaler skipped it
        self.on_optimizer_post: list = []         # fn(optimizer), watched optimizers only
        self.on_step_end: list = []               # fn(), after the boundary marker
        # fn(), at the ends of steps 2, 4, 8, 16, ... only: a look at the model and the
        # optimizers while the loop holds them (a loop in main() under `memprof run` frees
        # them before the block ends), at no per-step call
        self.on_look_step: list = []
        self._next_look = FIRST_LOOK_STEP
        self.explicit = False                     # steps marked by an optimizer or prof.step()
        self._waiting: set[int] = set()           # ids of optimizers whose closure runs first
        # >0 while an optimizer calls its closure again inside its step (LBFGS's line search):
        # the same batch evaluated again, not a micro-step and not the step's loss
        self.reevaluating = 0
        # optimizers whose step runs inside a watched one's (ZeroRedundancyOptimizer's local
        # optimizer): id -> weak reference; ids of those stepping now
        self._nested: dict[int, weakref.ref] = {}
        self._nested_now: set[int] = set()
        self._thread = threading.local()          # .depth: optimizer steps begun, not ended
        self._handles: list = []

    @property
    def optimizer(self):
        """The optimizer track() was given (unwrapped), while it is alive; else None."""
        return None if self._optimizer is None else self._optimizer()

    def watches(self, optimizer) -> bool:
        # (the reference read here, not through .optimizer: three calls a step)
        ref = self._optimizer
        watched = None if ref is None else ref()
        return watched is None or optimizer is watched

    @property
    def optimizers(self) -> list:
        """The watched optimizers seen stepping and still alive, in the order first seen."""
        return [o for o in (r() for r in self._seen.values()) if o is not None]

    def stepped(self) -> list:
        """Every optimizer seen stepping (watched or not) and still alive."""
        return [o for o in (r() for r in self._stepped.values()) if o is not None]

    def holders(self) -> list:
        """stepped(), and the optimizers stepped inside theirs: ZeroRedundancyOptimizer holds
        no state itself; its local `.optim` holds this rank's shard's."""
        out = self.stepped()
        out += [o for o in (r() for r in tuple(self._nested.values()))
                if o is not None and not any(o is x for x in out)]
        return out

    def watched(self) -> list:
        """The optimizers whose state is the run's: the one given to track() (else every one
        seen), and those stepped inside their steps (ZeroRedundancyOptimizer holds no state of
        its own: its local optimizer `.optim` does)."""
        watched = self.optimizer
        out = [watched] if watched is not None else self.optimizers
        for ref in tuple(self._nested.values()):
            inner = ref()
            if inner is not None and not any(inner is o for o in out):
                out.append(inner)
        return out

    def mark(self, label: str, value: int | None = None) -> None:
        _C.mark(label, int(self.step if value is None else value))

    def install(self, patches: PatchRegistry | None = None) -> None:
        self.step_seqs = array("q", [int(_C.peek_sequence_nr())])
        if patches is not None:
            from torch.amp import GradScaler
            patches.patch(GradScaler, "step", self._wrap_scaler_step)
        from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                           register_optimizer_step_pre_hook)
        self._handles.append(register_optimizer_step_pre_hook(self._pre_hook))
        self._handles.append(register_optimizer_step_post_hook(self._post))
        never_compiled(self._pre_hook, self._pre, self._post)

    def remove(self) -> None:
        remove_handles(self._handles)

    def _pre_hook(self, optimizer, args, kwargs):
        """torch's pre-hook: a step begins (see _pre), unless it is nested in a watched
        optimizer's step (see _nested_step)."""
        if dynamo_compiling():   # break_graph_if_traced(), inline: a frame fewer each step
            torch._dynamo.graph_break()
        return outside_dynamo(self._hooked_step_starts, optimizer, args, kwargs)

    def _hooked_step_starts(self, optimizer, args, kwargs):
        depth = getattr(self._thread, "depth", 0)
        self._thread.depth = depth + 1
        if depth and self._nested_step(optimizer):
            self._nested_now.add(id(optimizer))
            self._nested[id(optimizer)] = weakref.ref(optimizer)
            return None
        self._nested_now.discard(id(optimizer))
        return self._step_starts(optimizer, args, kwargs)

    def _nested_step(self, optimizer) -> bool:
        """Whether this step runs inside a watched optimizer's step on this thread: its
        phase and its step's end are the outer one's (ZeroRedundancyOptimizer steps its local
        optimizer inside its own step; both post-hooks ended a step, two per iteration). Read
        from the frames of torch's step wrapper, so that a step that raised (no post-hook)
        leaves nothing behind; only where another step was begun and not ended."""
        stepping = _stepping_optimizers()
        self._thread.depth = max(1, len(stepping))
        return any(o is not optimizer and self.watches(o) for o in stepping)

    def _pre(self, optimizer, args, kwargs):
        """The optimizer's own work begins (its gradients are there to read); for
        `step(closure)` (args: the optimizer, then step's arguments) when the closure returns.
        In a compiled optimizer step dynamo breaks its graph here and runs the hook eagerly
        (stepping aside while traced would leave the steps to auto_steps, whose update watch
        makes a compiled step recompile at every call)."""
        break_graph_if_traced()
        return outside_dynamo(self._step_starts, optimizer, args, kwargs)

    def _step_starts(self, optimizer, args, kwargs):
        if len(args) > 1 or kwargs:
            closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
            if callable(closure):
                return self._after_closure(optimizer, closure, args, kwargs)
        stepped = self._stepped.get(id(optimizer))
        params = None   # ids of its parameters, read at its first step only
        if stepped is None or stepped() is not optimizer:
            self._stepped[id(optimizer)] = weakref.ref(optimizer)
            params = [id(p) for g in optimizer.param_groups for p in g["params"]]
            self.updated.update(params)
        if self.watches(optimizer):
            seen = self._seen.get(id(optimizer))
            if seen is None or seen() is not optimizer:   # new (or a new one at a reused id)
                self._seen[id(optimizer)] = weakref.ref(optimizer)
                if seen is not None or id(optimizer) not in self._labels:   # (labelled at a
                    # skipped first step: the same optimizer, its label kept)
                    self._labels[id(optimizer)] = len(self._labels) + 1
                self.trained.update(params if params is not None else
                                    (id(p) for g in optimizer.param_groups for p in g["params"]))
            _C.optimizer_start(self.step)   # its marker, then the phase
        for fn in tuple(self.on_optimizer_pre):
            fn(optimizer)
        return None

    def _after_closure(self, optimizer, closure, args, kwargs):
        """`optimizer.step(closure)` (LBFGS, Lightning's automatic optimisation): the closure
        runs the forward and backward inside the step, so the update starts when it returns
        (the first time: LBFGS calls it again in its line search, each time followed by more
        of its own work)."""
        clock = self
        if not self.explicit and self.step_on in ("auto", "optimizer") and \
                self.watches(optimizer):
            # this optimizer marks the steps: auto steps stop before its closure runs (LBFGS
            # changes the parameters between the closure's calls inside one step)
            self.explicit = True
        self._waiting.add(id(optimizer))   # started at the post-hook if never called

        calls = [0]

        def closure_then_update(*a, **k):
            calls[0] += 1
            again = calls[0] > 1 and clock.watches(optimizer)
            if again:
                clock.reevaluating += 1
                _C.mark("reevaluation_start", clock.step)
            try:
                result = closure(*a, **k)
            except BaseException:   # the step is abandoned: no post-hook will run
                clock._waiting.discard(id(optimizer))
                raise
            finally:
                if again:
                    clock.reevaluating -= 1
                    _C.mark("reevaluation_end", clock.step)
            if id(optimizer) in clock._waiting:
                clock._waiting.discard(id(optimizer))
                clock._pre(optimizer, (optimizer,), {})
            elif clock.watches(optimizer):
                _C.optimizer_start(clock.step)
            return result

        if "closure" in kwargs:
            return args, dict(kwargs, closure=closure_then_update)
        return (args[0], closure_then_update) + tuple(args[2:]), kwargs

    def _post(self, optimizer, args, kwargs) -> None:
        if dynamo_compiling():   # (see _pre; break_graph_if_traced(), inline)
            torch._dynamo.graph_break()
        outside_dynamo(self._hooked_step_ends, optimizer)

    def _hooked_step_ends(self, optimizer) -> None:
        self._thread.depth = max(0, getattr(self._thread, "depth", 0) - 1)
        if id(optimizer) in self._nested_now:   # the outer step ends the step; its state is
            self._nested_now.discard(id(optimizer))     # noted (the real one under ZeRO)
            for fn in tuple(self.on_optimizer_post):
                fn(optimizer)
            return
        self._step_ends(optimizer)

    def _wrap_scaler_step(self, original):
        clock = self

        def step(scaler, optimizer, *args, **kwargs):
            steps = clock._optimizer_steps
            out = original(scaler, optimizer, *args, **kwargs)
            if clock._optimizer_steps == steps and clock.step_on in ("auto", "optimizer") \
                    and _found_inf(scaler, optimizer):
                opt = torch_optimizer(optimizer)
                if clock.watches(opt):   # skipped: the scaler found inf/NaN gradients
                    outside_dynamo(clock._skipped_step, opt)
            return out
        return step

    def _skipped_step(self, optimizer) -> None:
        self.skipped.append(self.step)
        for fn in tuple(self.on_skipped):
            fn(optimizer)
        self.end_step(owner=self._label(optimizer), phase=PHASE_OTHER)

    def _label(self, optimizer) -> int:
        owner = self._labels.get(id(optimizer))
        if owner is None:   # (its step began before the block did, or was skipped)
            owner = self._labels[id(optimizer)] = len(self._labels) + 1
        return owner

    def _step_ends(self, optimizer) -> None:
        if self._waiting and id(optimizer) in self._waiting:
            self._waiting.discard(id(optimizer))
            self._pre(optimizer, (optimizer,), {})   # a step given a closure it did not call
        if not self.watches(optimizer):
            return
        for fn in tuple(self.on_optimizer_post):
            fn(optimizer)
        if self.step_on in ("auto", "optimizer"):
            self._optimizer_steps += 1
            # (labels count from 1: the label read inline, _label() makes a new one)
            self.end_step(owner=self._labels.get(id(optimizer)) or self._label(optimizer),
                          phase=PHASE_OTHER)
        else:
            _C.set_phase(PHASE_OTHER)

    def end_step(self, explicit: bool = True, owner: int = 0, phase: int = -1) -> None:
        """A step boundary; `explicit=False`: found by record.auto_steps; `owner`: the label of
        the optimizer that stepped (0: prof.step(), backward or auto steps); `phase`: set
        first, when given (one native call for the phase, the marker and the step)."""
        self.explicit = self.explicit or explicit
        self.began = False
        self.step_owners.append(owner)
        self.step_seqs.append(_C.step_end(self.step, phase))
        self.step += 1
        for fn in tuple(self.on_step_end):
            fn()
        if self.step >= self._next_look:
            self._next_look = 2 * self.step
            for fn in tuple(self.on_look_step):
                fn()


def _found_inf(scaler, optimizer) -> bool:
    """Whether the scaler found inf/NaN gradients for this optimizer's step (what made it
    skip the step; read after its step already synchronised on them). An optimizer whose
    step runs no hooks of torch's (no skip) is not taken for one. True where the scaler's
    state cannot be read (another torch): its hooks did not run."""
    try:
        found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        return any(float(v.item()) for v in found.values())
    except Exception:  # noqa: BLE001
        return True


def _step_wrapper_code():
    """The code of torch's wrapper around every optimizer's step() (the one that runs the
    step hooks), or None where this torch has none."""
    try:
        from torch.optim.optimizer import Optimizer
        return Optimizer.profile_hook_step(lambda *a, **k: None).__code__
    except Exception:  # noqa: BLE001
        return None


_STEP_WRAPPER_CODE = _step_wrapper_code()


def _stepping_optimizers() -> list:
    """The optimizers whose step() is running on this thread, innermost first."""
    out = []
    frame = sys._getframe(1) if _STEP_WRAPPER_CODE is not None else None
    while frame is not None:
        if frame.f_code is _STEP_WRAPPER_CODE:
            optimizer = frame.f_locals.get("self")
            if optimizer is not None:
                out.append(optimizer)
        frame = frame.f_back
    return out


_THREADS = threading.local()
_THREAD_NUMBERS = itertools.count(1)


def _thread_number() -> int:
    """This thread's number, never reused (threading.get_ident() is, by the next thread: six
    threads one after another, each with sequence numbers from 0, read as "backward twice")."""
    n = getattr(_THREADS, "number", None)
    if n is None:
        n = _THREADS.number = next(_THREAD_NUMBERS)
    return n


class BackwardHook:
    """The one wrapper of torch.autograd.backward while recording: notes each call (roots,
    retain_graph, step) for the backward-misuse check, ends the backward phase, and runs the
    recorders' callbacks: `before(tensors, grad_tensors)`, `after()`."""

    def __init__(self, steps: StepClock):
        self.steps = steps
        # (roots' sequence numbers, retain_graph, step, thread) per call: tuples of ints,
        # which Python's collector stops walking (a dict and a list per step did, for the
        # whole run); sequence numbers count per thread, so two threads' graphs are told
        # apart by the thread (two models trained on two threads read as "backward ran more
        # than once through the same graph")
        self.calls: list[tuple[tuple[int, ...], bool, int, int]] = []
        self.before: list = []
        self.after: list = []
        self.removed = False

    def install(self, patches: PatchRegistry) -> None:
        self.removed = False
        patches.patch(torch.autograd, "backward", self._wrap)

    def remove(self) -> None:
        """The block has ended (its registry restores torch.autograd.backward)."""
        self.removed = True

    def _wrap(self, original):
        # weakly, and passing through once the block has ended (remove()): a copy of the
        # wrapper may outlive the block (another library's wrapper around it)
        ref = weakref.ref(self)

        def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False,
                     *args, **kwargs):
            hook = ref()
            if hook is None or hook.removed:
                return original(tensors, grad_tensors, retain_graph, create_graph,
                                *args, **kwargs)
            if dynamo_compiling():   # (a compiled training step: dynamo breaks here anyway;
                torch._dynamo.graph_break()   # break_graph_if_traced(), inline)
            outside_dynamo(hook._starts, tensors, grad_tensors, retain_graph, create_graph)
            out = original(tensors, grad_tensors, retain_graph, create_graph, *args, **kwargs)
            outside_dynamo(hook._ended)
            return out
        never_compiled(backward)
        return backward

    def _starts(self, tensors, grad_tensors, retain_graph, create_graph) -> None:
        # a pass that accumulates into .grad (a micro-step's), told apart from the engine's
        # other passes - torch.autograd.grad, torch.func.grad: a MAML inner loop, a gradient
        # penalty - which mark only "backward_start" (analyse.throughput counts micro-steps)
        _C.mark("backward_call", self.steps.step)
        self.steps.began = True
        # the call, noted for the backward-misuse check
        try:
            roots = []
            for t in (tensors if isinstance(tensors, (list, tuple)) else (tensors,)):
                # a node's sequence number identifies it for the whole run (ids get reused)
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    roots.append(t.grad_fn._sequence_nr())
            self.calls.append((tuple(roots), bool(retain_graph if retain_graph is not None
                                                  else create_graph), self.steps.step,
                               getattr(_THREADS, "number", None) or _thread_number()))
        except Exception:  # noqa: BLE001  (recording must never break backward)
            pass
        for fn in tuple(self.before):
            fn(tensors, grad_tensors)

    def noted(self) -> list[dict]:
        """The calls as the profile keeps them (analyse.backward reads them)."""
        return [{"roots": list(roots), "retain_graph": retain, "step": step, "thread": thread}
                for roots, retain, step, thread in self.calls]

    def _ended(self) -> None:
        # backward is over: what runs next (logging, the next micro-step's data) is not;
        # its end marker (analyse.throughput's backward time, the report's phase ends)
        _C.backward_end(self.steps.step)
        for fn in tuple(self.after):
            fn()
        if self.steps.step_on == "backward":
            self.steps.end_step()
