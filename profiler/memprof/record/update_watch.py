"""The update of a loop without an optimizer (`p -= lr * p.grad`, `p.data.add_(...)`): where
it begins and ends, so that its time and its temporaries are the optimizer phase, as
`optimizer.step()`'s are.

No hook announces a hand-written update; record.auto_steps finds the step only afterwards
(the parameters changed by the next forward). So from each backward to the next forward a
torch function mode looks at each torch call for an in-place write to a parameter's memory:
the first one marks `update_start` (its value: when the call that last read a gradient before
it began, the `lr * p.grad` of that write), and when the step ends an `update_end` marker
carries the time the last write returned. Calls between the two (the `lr * p.grad` of the
next parameter, a momentum buffer's update) are the update; what follows the last write (the
next batch made or loaded) is not. The session gives the updating thread's memory events
between them the optimizer phase (`label_updates`), the throughput table times them as the
optimizer (on the host clock: with CUDA timing the update stays in "other").

The mode is on only from a backward to the next forward, only while steps are found this way
(an optimizer loop: its first step), and not under another torch function mode: a forward
never runs under it, and a hand-written loop pays a Python call per torch call between its
backward and its next forward.
"""
from __future__ import annotations

import sys
import time
import types

import numpy as np
import torch
from torch.overrides import (TorchFunctionMode, _get_current_function_mode_stack, _pop_mode,
                             _push_mode)
from torch.utils import _device

from .. import _C
from .events import KIND_MARK, KIND_MEMORY, PHASE_OPTIMIZER, PHASE_OTHER
from .module_call import never_compiled

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
        # calls inside __torch_function__, where torch has taken this mode off the stack for
        # the call: an open() from there (a grad or backward that torch hands to the mode
        # and which runs memprof's hooks) would push a second copy, left on after the block
        self._handling = 0
        never_compiled(self.__torch_function__, self._handle)   # (a compiled step's fallback)

    def open(self, params: list[torch.Tensor]) -> None:
        """After a backward: watch these parameters' memory until the next forward (close).
        Not while another torch function mode is on (torch.set_default_device's, a user's):
        under it this one would sit on the stack in an order neither expects."""
        if self._handling or _get_current_function_mode_stack() or \
                _device.CURRENT_DEVICE is not None:
            return   # (this one included: still open)
        self._ptrs = frozenset(q for q in map(_ptr, params) if q is not None)
        self._grads = frozenset(q for q in (_ptr(p.grad) for p in params if p.grad is not None)
                                if q is not None)   # (a sparse gradient has no data pointer)
        self._grad_read_t = 0
        _push_mode(self)

    def close(self, step_ended: bool) -> None:
        """The window ends (the next forward, or the block); `step_ended`: at a step boundary
        found by auto steps, where the update's end is marked. The mode comes off the stack
        wherever it is (a backward run through another mode's handler put it beneath that
        mode), the modes above it kept in their order."""
        if step_ended and self._started:
            _C.mark("update_end", self._last_end)
            self._started = False
        while self._on_stack():   # (every copy: one pushed twice is not left behind)
            above = []
            while True:
                mode = _pop_mode()
                if mode is self:
                    break
                above.append(mode)
            for mode in reversed(above):
                _push_mode(mode)

    def _on_stack(self) -> bool:
        return any(m is self for m in _get_current_function_mode_stack())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self._handling += 1
        try:
            return self._handle(func, args, kwargs or {})
        finally:
            self._handling -= 1

    def _handle(self, func, args, kwargs):
        # dynamo traces through the mode (a compiled function called after a backward): it
        # reads the check as a constant and traces the call alone
        if torch.compiler.is_compiling():
            return func(*args, **kwargs)
        call = _as_called_by_the_caller(func)
        if self._steps.explicit or _C.get_phase() == PHASE_OPTIMIZER:   # (an optimizer's step)
            return call(func, args, kwargs)
        target = _first_tensor(args) if _writes(func) else None
        if target is not None and _ptr(target) in self._ptrs:
            if not self._started:
                self._started = True
                # from the call that read a gradient just before (`lr * p.grad`)
                _C.mark("update_start", self._grad_read_t or time.monotonic_ns())
            out = call(func, args, kwargs)
            self._last_end = time.monotonic_ns()
            return out
        if not self._started and any(isinstance(a, torch.Tensor) and _ptr(a) in self._grads
                                     for a in args):
            self._grad_read_t = time.monotonic_ns()
        return call(func, args, kwargs)


def _call(func, args, kwargs):
    return func(*args, **kwargs)


#: (caller's code, line) -> _call made to read as that line of the caller's (bounded; let go
#: when a block ends: each holds its caller's globals)
_AS_CALLED_FROM: dict = {}
_MAX_CALL_SITES = 4096
_TORCH_OVERRIDES = sys.modules["torch.overrides"].__file__
#: the copies' name in a traceback or a profiler, where python shows no frame at all
CALL_SITE_NAME = "<memprof: torch call>"


def is_call_site(code) -> bool:
    """Whether `code` is one of `_call`'s copies that read as a caller's line: a traceback
    printed as python prints it leaves that frame out (it repeats the caller's line)."""
    return getattr(code, "co_name", None) == CALL_SITE_NAME


def forget_call_sites() -> None:
    """The block ended: the copies, and the callers' globals they hold, are let go."""
    _AS_CALLED_FROM.clear()


def _as_called_by_the_caller(func):
    """`_call` with the file, line, function name and globals of the code that called the
    torch function, so that what the call warns reads as python says it without this mode:
    a C op's warning (`float(loss)` on a tensor that requires grad) was attributed to this
    file, where a `-W error::UserWarning:__main__` filter or the `__main__` module's
    show-once registry never saw it. The frames between are torch's dispatch
    (`handle_torch_function`) and, for a function written in Python, its first run."""
    try:
        frame = sys._getframe(3)   # _handle <- __torch_function__ <- the dispatch or the caller
    except ValueError:
        return _call
    while frame is not None and frame.f_code.co_filename == _TORCH_OVERRIDES:
        frame = frame.f_back
    if frame is not None and frame.f_code is getattr(func, "__code__", None):
        frame = frame.f_back
    if frame is None:
        return _call
    key = (frame.f_code, frame.f_lineno)
    made = _AS_CALLED_FROM.get(key)
    if made is None:
        if len(_AS_CALLED_FROM) >= _MAX_CALL_SITES:
            _AS_CALLED_FROM.clear()
        code = _call.__code__.replace(co_filename=frame.f_code.co_filename,
                                      co_name=CALL_SITE_NAME,
                                      co_firstlineno=max(0, (frame.f_lineno or 1) - 1))
        made = _AS_CALLED_FROM[key] = types.FunctionType(code, frame.f_globals)
    return made


def optimizer_spans(side: np.ndarray, strings: list[str]) -> list[tuple[int, int, int]]:
    """(start ns, end ns, thread) of each hand-written update, from the markers in the side
    stream (the thread that ran it)."""
    ids = {s: i for i, s in enumerate(strings) if s in ("update_start", "update_end")}
    if len(ids) < 2:
        return []
    marks = side[(side["kind"] == KIND_MARK) & np.isin(side["op"], list(ids.values()))]
    spans, start = [], None
    for op, value, thread in zip(marks["op"].tolist(), marks["ptr"].tolist(),
                                 marks["thread"].tolist()):
        if op == ids["update_start"]:
            start = (int(value), int(thread))
        elif start is not None:
            spans.append((start[0], int(value), start[1]))
            start = None
    return spans


def label_updates(streams, strings: list[str]) -> None:
    """Give the memory events of each hand-written update the optimizer phase (they were
    recorded as "other": no hook said an update ran); only the updating thread's, as another
    thread's blocks take no phase of the training thread. Both streams are time-ordered."""
    for start, end, thread in optimizer_spans(streams.side, strings):
        for events in (streams.memory, streams.side):
            t = events["t_ns"]
            lo, hi = np.searchsorted(t, start, "left"), np.searchsorted(t, end, "right")
            span = events[lo:hi]
            other = ((span["kind"] == KIND_MEMORY) & (span["phase"] == PHASE_OTHER)
                     & (span["thread"] == thread))
            events["phase"][lo:hi][other] = PHASE_OPTIMIZER
