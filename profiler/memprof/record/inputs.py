"""What the root module was called with: shapes and dtypes of its first forward pass.

Recorded once (the first real forward pass of the root; a never-called container's models
are not what was tracked, and record nothing), as plain data: enough to build a
batch of the same structure at another micro-batch on fake tensors, which is how
`memprof.plan.fit` re-estimates a step that did not fit. Values are never kept; a tensor is
{"shape", "dtype", "device"}, a number or string is kept as it is, anything else is named by
its type (and then no batch can be rebuilt from the record). Also recorded: whether autocast
was on at that forward pass and in which dtype, and the bytes of the tracked model's floating
parameters per dtype (together: the precision the step ran in, `memprof.plan.precision`).
Autocast off as the model is called but entered by the forward itself (accelerate's
`prepare(model)` with mixed precision wraps the forward in it; a model's own `with
torch.autocast`) is the pass's too: read at the call alone, such a bf16 run read as fp32.
`autocast.__enter__` is wrapped for that (the first) pass only: later entries pay nothing.
"""
from __future__ import annotations

import threading

import torch
from torch.amp.autocast_mode import autocast as _autocast

MAX_DEPTH = 4
MAX_ITEMS = 64
MAX_STR = 256


def describe(value, depth: int = MAX_DEPTH):
    """A plain, JSON-able description of a call argument (see the module docstring)."""
    if isinstance(value, torch.Tensor):
        return {"tensor": {"shape": list(value.shape), "dtype": str(value.dtype).split(".")[-1],
                           "device": value.device.type}}
    if value is None or isinstance(value, (bool, int, float)) \
            or (isinstance(value, str) and len(value) <= MAX_STR):
        return {"value": value}
    if depth > 0 and isinstance(value, (list, tuple)) and len(value) <= MAX_ITEMS:
        return {"tuple" if isinstance(value, tuple) else "list":
                [describe(v, depth - 1) for v in value]}
    if depth > 0 and isinstance(value, dict) and len(value) <= MAX_ITEMS \
            and all(isinstance(k, str) for k in value):
        return {"dict": {k: describe(v, depth - 1) for k, v in value.items()}}
    return {"object": type(value).__name__}


def weight_dtypes(module) -> dict:
    """{dtype name: bytes} of `module`'s floating parameters (each once): a model built in
    bf16 computes in bf16 without autocast."""
    out: dict[str, int] = {}
    seen = set()
    for p in module.parameters() if module is not None else ():
        if id(p) in seen or not p.is_floating_point():
            continue
        seen.add(id(p))
        name = str(p.dtype).split(".")[-1]
        out[name] = out.get(name, 0) + p.numel() * p.element_size()
    return out


def autocast_state() -> dict:
    """{device type: autocast dtype} for the device types where autocast is on."""
    out = {}
    for dev in ("cuda", "cpu"):
        try:
            if torch.is_autocast_enabled(dev):
                out[dev] = str(torch.get_autocast_dtype(dev)).split(".")[-1]
        except (RuntimeError, TypeError, AttributeError):  # device type unknown to this build
            continue
    return out


class InputRecorder:
    """The first forward pass of the root: its arguments (described) and the autocast state."""
    name = "inputs"

    def __init__(self):
        self._record: dict | None = None
        self._session = None
        self._inside: int | None = None   # the first pass's thread, while it runs autocast-off
        self._enter = None   # autocast.__enter__ wrapped: for the first pass only

    def install(self, session) -> None:
        self._session = session
        session.scope.on_forward_start.append(self._forward_start)

    def remove(self) -> None:
        self._unwrap()
        self._session = None
        self._inside = None

    def _unwrap(self) -> None:
        """torch's own autocast.__enter__ again: later entries pay no frame of memprof's."""
        if self._enter is not None and self._session is not None:
            self._session.patches.undo(self._enter)
        self._enter = None

    def _wrap_enter(self, original):
        recorder = self

        def __enter__(ctx):
            out = original(ctx)
            if recorder._inside is not None and recorder._inside == threading.get_ident() \
                    and not torch.compiler.is_compiling():
                state = autocast_state()
                if state:   # (an `autocast(enabled=False)` inside the forward is no precision)
                    recorder._record["autocast"] = state
                    recorder._record["autocast_entered_in_forward"] = True
                    recorder._inside = None
            return out
        return __enter__

    def _forward_end(self) -> None:
        self._inside = None
        self._unwrap()
        scope = self._session.scope if self._session is not None else None
        if scope is not None and self._forward_end in scope.on_forward_end:
            scope.on_forward_end.remove(self._forward_end)

    def _forward_start(self, args, kwargs) -> None:
        if self._record is not None:
            return
        scope = self._session.scope
        if not scope.module_call:   # a training_step's (batch, batch_idx)
            return
        if scope.model is not None and scope.pass_module is not scope.model:
            return   # a container's model (a GAN's G): not the inputs of what was tracked
        # the first pass only: later ones need not call in (record.steps on per-step frames)
        if self._forward_start in scope.on_forward_start:
            scope.on_forward_start.remove(self._forward_start)
        self._record = {"args": [describe(a) for a in args],
                        "kwargs": {str(k): describe(v) for k, v in (kwargs or {}).items()},
                        "autocast": autocast_state(),
                        "weights": weight_dtypes(scope.model if scope.model is not None
                                                 else scope.pass_module),
                        "step": self._session.step if self._session is not None else 0}
        if not self._record["autocast"]:   # the forward may enter it itself (accelerate's)
            self._inside = threading.get_ident()
            self._enter = self._session.patches.patch(_autocast, "__enter__", self._wrap_enter)
            scope.on_forward_end.append(self._forward_end)

    def record(self) -> dict | None:
        return self._record
