"""The update of a loop without an optimizer (`p -= lr * p.grad`, `p.data.add_(...)`): where
it begins and ends, so that its time and its temporaries are the optimizer phase, as
`optimizer.step()`'s are.

No hook announces a hand-written update; record.auto_steps finds the step only afterwards
(the parameters changed by the next forward). So between a backward and the next forward a
torch function mode looks at each torch call for an in-place write to a parameter's memory:
the first one marks `update_start` (its value: when the call that last read a gradient before
it began, the `lr * p.grad` of that write), and when the step ends an `update_end` marker carries the
time the last write returned. Calls between the two (the `lr * p.grad` of the next parameter,
a momentum buffer's update) are the update; what follows the last write (the next batch made
or loaded) is not. The session gives the memory events between them the optimizer phase
(`optimizer_spans`), the throughput table times them as the optimizer. The mode is on only in that window and only while steps are found this way
(a loop with torch.optim stops it at its first optimizer step): an optimizer loop never pays
for it, a hand-written one pays a Python call per torch call of its update.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from .. import _C
from .events import KIND_MARK, KIND_MEMORY, PHASE_OPTIMIZER, PHASE_OTHER

#: in-place operators as torch functions name them (`p -= x` is Tensor.__isub__)
_INPLACE_OPERATORS = frozenset(f"__i{op}__" for op in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift",
    "rshift", "matmul"))


def _writes(func) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_OPERATORS


def _ptr(t) -> int | None:
    """A tensor's data pointer; None for one without memory of its own to compare (a fake
    tensor while torch.compile traces, a wrapper subclass)."""
    try:
        return t.data_ptr()
    except RuntimeError:
        return None


def _first_tensor(args):
    """The tensor a call writes to: its first argument (the tensor of a method, the list of
    a _foreach_ op)."""
    first = args[0] if args else None
    if isinstance(first, (list, tuple)) and first:
        first = first[0]
    return first if isinstance(first, torch.Tensor) else None


class UpdateWatch(TorchFunctionMode):
    def __init__(self, steps):
        super().__init__()
        self._steps = steps            # the StepClock: markers carry its step
        self._ptrs: frozenset = frozenset()       # the parameters' memory
        self._grads: frozenset = frozenset()      # their gradients'
        self._grad_read_t = 0                     # when a call last read a gradient
        self._started = False
        self._last_end = 0
        self._entered = False

    def open(self, params: list[torch.Tensor]) -> None:
        """From a backward on: watch these parameters' memory (again) until close()."""
        self._ptrs = frozenset(p.data_ptr() for p in params)
        self._grads = frozenset(p.grad.data_ptr() for p in params if p.grad is not None)
        self._grad_read_t = 0
        if not self._entered:
            self.__enter__()
            self._entered = True

    def close(self, step_ended: bool) -> None:
        """The window ends (the next forward, or the block); `step_ended`: at a step boundary
        found by auto steps, where the update's end is marked."""
        if step_ended and self._started:
            _C.mark("update_end", self._last_end)
        self._started = False
        if self._entered:
            stack = _get_current_function_mode_stack()
            if stack and stack[-1] is self:   # else a mode the user entered since is above it
                self.__exit__(None, None, None)
                self._entered = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # dynamo traces through the mode (a compiled function called after a backward): it
        # reads the check as a constant and traces the call alone
        if torch.compiler.is_compiling() or self._steps.explicit or \
                _C.get_phase() == PHASE_OPTIMIZER:   # (an optimizer's step)
            return func(*args, **kwargs)
        target = _first_tensor(args) if _writes(func) else None
        if target is not None and _ptr(target) in self._ptrs:
            if not self._started:
                self._started = True
                # from the call that read a gradient just before (`lr * p.grad`)
                _C.mark("update_start", self._grad_read_t or time.monotonic_ns())
            out = func(*args, **kwargs)
            self._last_end = time.monotonic_ns()
            return out
        if not self._started and any(isinstance(a, torch.Tensor) and _ptr(a) in self._grads
                                     for a in args):
            self._grad_read_t = time.monotonic_ns()
        return func(*args, **kwargs)


def optimizer_spans(side: np.ndarray, strings: list[str]) -> list[tuple[int, int]]:
    """(start ns, end ns) of each hand-written update, from the markers in the side stream."""
    ids = {s: i for i, s in enumerate(strings) if s in ("update_start", "update_end")}
    if len(ids) < 2:
        return []
    marks = side[(side["kind"] == KIND_MARK) & np.isin(side["op"], list(ids.values()))]
    spans, start = [], None
    for op, value in zip(marks["op"].tolist(), marks["ptr"].tolist()):
        if op == ids["update_start"]:
            start = int(value)
        elif start is not None:
            spans.append((start, int(value)))
            start = None
    return spans


def label_updates(streams, strings: list[str]) -> None:
    """Give the memory events of each hand-written update the optimizer phase (they were
    recorded as "other": no hook said an update ran); both streams are time-ordered."""
    for start, end in optimizer_spans(streams.side, strings):
        for events in (streams.memory, streams.side):
            t = events["t_ns"]
            lo, hi = np.searchsorted(t, start, "left"), np.searchsorted(t, end, "right")
            span = events[lo:hi]
            other = (span["kind"] == KIND_MEMORY) & (span["phase"] == PHASE_OTHER)
            events["phase"][lo:hi][other] = PHASE_OPTIMIZER
