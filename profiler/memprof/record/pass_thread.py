"""Which thread's module calls are forward passes: the block's, unless it waits for a thread
that trains (a script that starts its training thread and joins it); calls on any other
thread (a background evaluation, a prefetcher) run in their modules' scope and are no passes.
"""
from __future__ import annotations

import concurrent.futures
import os
import sys
import threading

import torch

from . import module_call

#: outermost module calls on another thread that look whether the block's thread waits for
#: it (a few us each): then no more (a loop that polls `thread.is_alive()` never joins)
MAX_ADOPT_LOOKS = 256
_THREADING_FILE = os.path.splitext(threading.__file__)[0] + ".py"

#: where a wait for other threads to end returns from: Thread.join, a future's result, wait,
#: as_completed, an executor's shutdown (its `with` block's end)
_JOINS = {_THREADING_FILE: ("join",), **{
    os.path.join(os.path.dirname(concurrent.futures.__file__), f): (
        "result", "wait", "as_completed", "shutdown", "__exit__")
    for f in ("_base.py", "thread.py", "process.py")}}


def _joining(frame) -> bool:
    """Whether a thread waits for others to end, called from its own code: its innermost
    frames (the standard library's waiting) reach Thread.join or a future's result before
    any other code - not an Event or a queue (a loop waiting for its data), and not a thread
    that is itself an executor's worker (whose loop is always on its stack)."""
    while frame is not None and frame.f_code.co_filename in _JOINS:
        if frame.f_code.co_name in _JOINS.get(frame.f_code.co_filename, ()):
            return True
        frame = frame.f_back
    return False


def outermost_module_call() -> bool:
    """Whether the module call running on this thread is inside no other one."""
    code, frame, calls = module_call.module_call.__code__, sys._getframe(1), 0
    while frame is not None and calls < 2:
        calls += frame.f_code is code
        frame = frame.f_back
    return calls < 2


class PassThread:
    """The thread whose module calls are passes, and the rule that hands them to another."""

    def __init__(self):
        self.ident = threading.get_ident()   # the thread whose calls are passes
        self._block_thread = self.ident      # the thread that entered the block
        self._lock = threading.Lock()
        self.started = False                 # a pass ran
        self._looks = 0                      # looks at the block's thread (see takes)

    def takes(self, module, nested_ok: bool) -> bool:
        """Whether a module call on a thread other than the passes' one starts passes there.
        While no pass ran and the block's thread waits for others to end (a script training
        on a thread it started and joins: its model had no pass, no batch size and no module
        attribution), the first thread to call the model - with gradients on, and in auto
        mode the outermost call of a module with trainable parameters, not a preprocessing
        transform - takes the passes; the block's thread takes them back once that thread
        ended. A background evaluation or prefetcher beside a training loop stays in scope,
        no pass (the loop's thread is busy, or passes ran). `nested_ok`: the model itself
        (track(model)), whose call may be inside a wrapper's (DDP)."""
        me = threading.get_ident()
        with self._lock:
            if me == self._block_thread:   # the passes went to a thread it waited for
                if self.ident in sys._current_frames():
                    return False
                self.ident = me           # that thread ended
                return True
            if self.started or self._looks >= MAX_ADOPT_LOOKS or \
                    not torch.is_grad_enabled() or not (nested_ok or outermost_module_call()):
                return False
            if not nested_ok and not any(p.requires_grad for p in module.parameters()):
                return False
            self._looks += 1
            if not _joining(sys._current_frames().get(self._block_thread)):
                return False
            self.ident = me                   # the thread the block's thread waits for
            self.started = True               # one thread takes them
            return True
