"""torch.compile while recording: which steps compiled (dynamo tracing a frame, AOT autograd's
lazy backward compile), so that analyse.throughput leaves those steps out of its statistics as
it leaves out the warm-up step - seconds of compilation are not data wait or host time - and
the report can say that the run was compiled.

The windows come from dynamo's own compile callbacks (`compile_start` / `compile_end` markers).
torch._dynamo is not imported for this (it costs seconds): when the code has not imported it
yet, torch.compile (which `nn.Module.compile()` also calls) registers the callbacks on its
first call.
"""
from __future__ import annotations

import functools
import sys
import time

import torch

from . import module_call


class CompileRecorder:
    name = "compile"

    def __init__(self):
        self.session = None
        self.windows: list[list] = []        # [step, seconds] per compilation
        self._handler = None
        self._t0: float | None = None

    def install(self, session) -> None:
        self.session = session
        if "torch._dynamo" in sys.modules:
            self._register()
        else:
            session.patches.patch(torch, "compile", self._wrap_compile)

    def _wrap_compile(self, original):
        recorder = self

        @functools.wraps(original)
        def compile(*args, **kwargs):
            recorder._register()
            return original(*args, **kwargs)
        return compile

    def _register(self) -> None:
        if self._handler is not None:
            return
        module_call.load_dynamo()   # (with torch's own Module.__call__ in place)
        from torch._dynamo.callback import callback_handler
        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)
        self._handler = callback_handler

    def remove(self) -> None:
        if self._handler is not None:
            self._handler.remove_start_callback(self._start)
            self._handler.remove_end_callback(self._end)
            self._handler = None

    def _start(self, args=None) -> None:
        self._t0 = time.perf_counter()
        self.session.steps.mark("compile_start")

    def _end(self, args=None) -> None:
        self.session.steps.mark("compile_end")
        if self._t0 is not None:
            self.windows.append([self.session.step, round(time.perf_counter() - self._t0, 6)])
            self._t0 = None

    def record(self) -> dict:
        """Plain data: the steps that compiled and how long each compilation took."""
        return {"steps": sorted({int(s) for s, _ in self.windows}),
                "seconds": round(sum(t for _, t in self.windows), 6),
                "windows": self.windows}
