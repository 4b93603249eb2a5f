"""Autocast that the model's own forward enters, seen while an estimate runs it.

A forward that enters `torch.autocast(device_type, dtype=torch.bfloat16)` itself (research
code, nanoGPT-style models) computes in that dtype whatever precision the loop around it
asks: recommend's "fp32" row computed bf16 and gave bf16's bytes, next to a bf16 row that was
the same step, and on a GPU without bf16 (V100) the model's bf16 was offered as "fp32" with
no word that the GPU cannot run it at bf16 speed. So while an estimate runs the forward:

* an autocast the model's code enters with a half dtype is noted: the module whose forward
  entered it, the device type and dtype as written (`OwnAutocast.entered`);
* a "cuda" one runs as CPU autocast of the same dtype (estimates compute on CPU fake tensors,
  where a cuda autocast does nothing: the step would have been estimated in fp32).

The plan then keeps one row where the model's root forward sets the precision of the whole
step (`merge`), and says why in one note (`notes`).
"""
from __future__ import annotations

import contextlib
import sys

import torch
from torch.amp.autocast_mode import autocast as _autocast

from ..record.patches import PatchRegistry
from .cuda_autocast import LOW_PRECISION_DTYPES

__all__ = ["OwnAutocast", "describe", "notes", "merge"]

_NAMES = {v: k for k, v in LOW_PRECISION_DTYPES.items()}
_FRAMES = 8   # how far up from autocast's __enter__ the module's forward is looked for


class OwnAutocast:
    """While open, notes the first half-precision autocast the model's code enters
    (`entered`: {"module", "class", "device", "precision", "whole"}; None: none)."""

    def __init__(self, model: torch.nn.Module):
        self.entered: dict | None = None
        self._model = model
        self._names: dict[int, str] | None = None
        self._stack = contextlib.ExitStack()

    def _module(self, frame):
        """(name, module) of the nearest module method on the stack above `frame`."""
        if self._names is None:
            self._names = {id(m): n for n, m in self._model.named_modules()}
        for _ in range(_FRAMES):
            if frame is None:
                return None
            me = frame.f_locals.get("self")
            if isinstance(me, torch.nn.Module) and id(me) in self._names:
                return self._names[id(me)], me
            frame = frame.f_back
        return None

    def _note(self, ctx, frame) -> None:
        precision = _NAMES.get(getattr(ctx, "fast_dtype", None))
        if self.entered is not None or precision is None or not getattr(ctx, "_enabled", False):
            return
        found = self._module(frame)
        if found is None:   # not the model's code (a loss, a wrapper of the estimate's)
            return
        name, module = found
        self.entered = {"module": name, "class": type(module).__name__,
                        "device": getattr(ctx, "_memprof_device", ctx.device),
                        "precision": precision, "whole": name == ""}

    def __enter__(self) -> "OwnAutocast":
        registry = PatchRegistry()
        watch = self

        def init(original):
            def __init__(ctx, device_type, dtype=None, *args, **kwargs):
                if device_type == "cuda":   # what the estimate can run: CPU autocast
                    ctx._memprof_device = "cuda"
                    device_type = "cpu"
                    dtype = dtype if dtype is not None else torch.float16   # cuda's default
                original(ctx, device_type, dtype, *args, **kwargs)
            return __init__

        def enter(original):
            def __enter__(ctx):
                out = original(ctx)
                watch._note(ctx, sys._getframe(1))
                return out
            return __enter__

        registry.patch(_autocast, "__init__", init)
        registry.patch(_autocast, "__enter__", enter)
        self._stack.callback(registry.restore)
        return self

    def __exit__(self, *exc) -> bool:
        self._stack.close()
        return False


def describe(own: dict) -> str:
    """'GPT (the model)' or 'transformer.h.0.attn (CausalSelfAttention)'."""
    return f"{own['class']} (the model)" if own["whole"] else \
        f"{own['module']} ({own['class']})"


def notes(own: dict | None, gpu) -> list[str]:
    """What the plan says of the model's own autocast on `gpu` (one line each)."""
    if not own:
        return []
    p = own["precision"]
    where = "it computes" if own["whole"] else "that part computes"
    out = [f"the model's forward sets its own precision: {describe(own)} enters "
           f"torch.autocast(dtype={p}) itself, so {where} in {p} whatever "
           "precision the loop asks" + ("; the precisions it overrides are one row"
                                       if own["whole"] else "")]
    if not gpu.supports(p):
        out.append(f"{gpu.name} has no {p} hardware support: the model's own {p} autocast "
                   f"will not run at {p} speed there (estimated with {p}'s bytes); change it "
                   "to fp16 for this GPU")
    return out


def merge(combos: dict, own: dict | None) -> None:
    """Where the model's root forward sets the step's precision, the rows of the precisions
    it overrides are one: its own precision's row where estimated, else fp32's (the model as
    it runs); the others are marked skipped, saying why."""
    if not own or not own["whole"]:
        return
    estimated = {p for (p, _), c in combos.items() if c.model is not None}
    keep = own["precision"] if own["precision"] in estimated else \
        "fp32" if "fp32" in estimated else None
    if keep is None:
        return
    for (p, _), c in combos.items():
        if p != keep and c.model is not None:
            c.model = None
            c.skipped = (f"not offered: {describe(own)} enters torch.autocast(dtype="
                         f"{own['precision']}) itself, so the {p} row would compute as the "
                         f"{keep} row")
