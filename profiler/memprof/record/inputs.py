"""What the root module was called with: shapes and dtypes of its first forward pass.

Recorded once (the first real forward pass of the root; a never-called container's models
are not what was tracked, and record nothing), as plain data: enough to build a
batch of the same structure at another micro-batch on fake tensors, which is how
`memprof.plan.fit` re-estimates a step that did not fit. Values are never kept; a tensor is
{"shape", "dtype", "device"}, a number or string is kept as it is, anything else is named by
its type (and then no batch can be rebuilt from the record). Also recorded: whether autocast
was on at that forward pass and in which dtype, and the bytes of the tracked model's floating
parameters per dtype (together: the precision the step ran in, `memprof.plan.precision`).
Autocast off as the model is called but entered by the forward itself (accelerate's, a
model's own) is the pass's too where it ran most of the pass, else "autocast_partial"
(`memprof.record.pass_autocast`).
"""
from __future__ import annotations

import torch

from .pass_autocast import PassAutocast, autocast_state

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


class InputRecorder:
    """The first forward pass of the root: its arguments (described) and the autocast state."""
    name = "inputs"

    def __init__(self):
        self._record: dict | None = None
        self._session = None
        self._watch: PassAutocast | None = None   # the first pass, while it runs autocast-off

    def install(self, session) -> None:
        self._session = session
        session.scope.on_forward_start.append(self._forward_start)

    def remove(self) -> None:
        if self._watch is not None:   # (the block ended inside its first pass)
            self._watch.remove()
            self._watch = None
        self._session = None

    def _forward_end(self) -> None:
        scope = self._session.scope if self._session is not None else None
        if scope is not None and self._forward_end in scope.on_forward_end:
            scope.on_forward_end.remove(self._forward_end)
        if self._watch is None:
            return
        state, partial = self._watch.end()
        self._watch = None
        if state:
            self._record["autocast"] = state
            self._record["autocast_entered_in_forward"] = True
        if partial:
            self._record["autocast_partial"] = partial

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
            self._watch = PassAutocast(self._session, scope.pass_module,
                                       weigh=not scope.compiled)
            scope.on_forward_end.append(self._forward_end)

    def record(self) -> dict | None:
        return self._record
