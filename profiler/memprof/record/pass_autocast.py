"""Autocast that the first forward pass enters itself, and over how much of the pass.

A model called with autocast off may enter it in its forward: accelerate's `prepare(model)`
with mixed precision wraps the whole forward in it, a model's own `with torch.autocast` may
cover its body or one small part (a head, the attention scores), and an autocast entered with
`enabled=False` (a softmax kept in fp32) switches it off again. Read at the call alone, an
accelerate bf16 run read as fp32; read at the first autocast entered, a bf16 head on an fp32
model read as a bf16 run, and fit re-estimated the whole model in it.

So the pass's precision is the autocast under which at least WHOLE_SHARE of the parameters
its module calls used ran (each call counts its module's own parameters, as autocast was at
the call); less is partial: the run keeps its weights' dtype and the record says so
(`memprof.analyse.partial_autocast`). The model's own parameters count for none (its forward
may be a wrapper that enters autocast after the call: accelerate's); where no called module
holds any (the model is one Linear, a model of its own nn.Parameters and functional ops) they
are weighed where the forward uses them: a pass-through torch function mode, for that first
pass only, counts them under the autocast on at each op they enter (read by whether autocast
was on at all, an autocast around a parameter-free softmax made such a model a bf16 run).
FSDP (FullyShardedDataParallel) moves the parameters of the modules a unit wraps into one flat
parameter on the wrapped module: a module counts what the flat parameters hold for it (the
root unit's for the modules outside the auto-wrapped children, which counted for none as the
model's own: a big fp32 head beside small bf16 blocks read as a bf16 run).

Watched for the first pass only: `autocast.__enter__` (through the session's patch registry)
and a global module forward pre-hook are set at its start and taken off at its end, so later
autocast entries and module calls pay no frame of memprof's. Not under torch.compile: a
global hook there would make dynamo compile the model again once it is off; such a pass is
read by whether autocast was on in it. The mode is taken off as dynamo starts compiling
(a torch.compile'd function in the forward): dynamo guards on the modes on the stack, and
compiled the function again once the mode was off.
"""
from __future__ import annotations

import itertools
import sys
import threading

import torch
from torch.amp.autocast_mode import autocast as _autocast
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

WHOLE_SHARE = 0.5   # of the parameters the pass used: under it, autocast is the run's precision


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


class PassAutocast:
    """Watches one forward pass on this thread, from start() to end() (see the module
    docstring)."""

    def __init__(self, session, root, weigh: bool):
        self._patches = session.patches
        self._roots = _wrapper_chain(root)   # ids: the model and the models it wraps
        self._thread = threading.get_ident()
        self._entered: dict | None = None   # the first autocast state turned on in the pass
        self._under: dict[tuple, int] = {}  # autocast state -> parameter elements under it
        self._off = 0
        self._watching = True   # (a wrapper left in place under another's passes through)
        self._enter = self._patches.patch(_autocast, "__enter__", self._wrap_enter)
        # FSDP: module id -> the elements flat parameters hold for it; the flat ones' ids
        self._flat, self._flat_ids = _flat_numels(root) if weigh else ({}, frozenset())
        self._hook = torch.nn.modules.module.register_module_forward_pre_hook(
            self._pre_hook) if weigh else None
        own = _roots_only(root, self._roots, self._flat, self._flat_ids) if weigh else None
        self._mode = _OwnUse(own, self) if own else None
        self._compiles = None
        if self._mode is not None:
            self._mode.__enter__()
            self._compiles = _on_compile_start(self._compile_starts)

    def _wrap_enter(self, original):
        watch = self

        def __enter__(ctx):
            out = original(ctx)
            if watch._watching and watch._entered is None \
                    and watch._thread == threading.get_ident() \
                    and not torch.compiler.is_compiling():
                watch._entered = autocast_state() or None   # (enabled=False: none)
            return out
        return __enter__

    def _pre_hook(self, module, _args):
        if id(module) in self._roots or self._thread != threading.get_ident() \
                or torch.compiler.is_compiling():
            return
        n = self._flat.get(id(module))
        if n is None:
            n = sum(p.numel() for p in module._parameters.values()
                    if p is not None and id(p) not in self._flat_ids)
        self._weigh(n)

    def _weigh(self, n: int) -> None:
        if not n:
            return
        state = autocast_state()
        if state:
            key = tuple(sorted(state.items()))
            self._under[key] = self._under.get(key, 0) + n
        else:
            self._off += n

    def end(self) -> tuple[dict, dict | None]:
        """Stop watching -> (the pass's autocast state: {} for none, the partial autocast
        {"autocast": state, "share": of the parameters} or None)."""
        self.remove()
        under = sum(self._under.values())
        if not under + self._off:   # no module's parameters to weigh: was it on at all
            return dict(self._entered or {}), None
        state = dict(max(self._under, key=self._under.get)) if under else \
            dict(self._entered or {})
        share = under / (under + self._off)
        if not state:
            return {}, None
        if share >= WHOLE_SHARE:
            return state, None
        return {}, {"autocast": state, "share": round(share, 4)}

    def remove(self) -> None:
        """Both watches off (idempotent): autocast.__enter__ is torch's own again."""
        self._watching = False
        if self._enter is not None:
            self._patches.undo(self._enter)
            self._enter = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._compiles is not None:   # (torch._dynamo.reset() clears them all)
            if self._compile_starts in self._compiles.start_callbacks:
                self._compiles.remove_start_callback(self._compile_starts)
            self._compiles = None
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.own = {}
            _take_off(mode)

    def _compile_starts(self, *_args) -> None:
        """Dynamo starts compiling on this thread: the mode off before it reads the stack (it
        guards on the stack's modes: traced with the mode, the code was compiled again once it
        was off). Its weighing ends there; the pass is read by the module calls and autocast."""
        # (*_args: torch 2.4-2.6 call it with none; nothing may raise into the user's compile)
        try:
            if self._mode is not None and self._thread == threading.get_ident() \
                    and _take_off(self._mode):
                self._mode.own, self._mode = {}, None
        except Exception:  # noqa: BLE001  (the weighing is a nicety; the compile is not)
            pass


class _OwnUse(TorchFunctionMode):
    """Weighs the model's own parameters (`own`: id -> elements) at each op they enter."""

    def __init__(self, own: dict, watch: PassAutocast):
        super().__init__()
        self.own, self._watch = own, watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():   # (dynamo traces no threading.get_ident: a break)
            return func(*args, **kwargs)
        if self.own and self._watch._thread == threading.get_ident():
            for a in itertools.chain(args, kwargs.values()):
                n = self.own.get(id(a)) if isinstance(a, torch.Tensor) else None
                if n:
                    self._watch._weigh(n)
        return func(*args, **kwargs)


def _take_off(mode) -> bool:
    """`mode` off this thread's function-mode stack wherever it sits, the modes above it kept
    in order (a pass that raised under a mode it entered): an inert mode left there cost a
    Python call on every torch function for the rest of the process."""
    if not any(m is mode for m in _get_current_function_mode_stack()):
        return False   # (not there, or popped while its __torch_function__ runs)
    above = []
    while (top := torch._C._pop_torch_function_stack()) is not mode:
        above.append(top)
    for m in reversed(above):
        torch._C._push_on_torch_function_stack(m)
    return True


def _on_compile_start(callback):
    """Dynamo's compile-start callbacks with `callback` added, or None where dynamo is not
    loaded (a torch.compile that the first pass itself loads it for is compiled again once
    the mode is off)."""
    dynamo = sys.modules.get("torch._dynamo")
    handler = getattr(getattr(dynamo, "callback", None), "callback_handler", None)
    if handler is None or not hasattr(handler, "register_start_callback"):
        return None
    handler.register_start_callback(callback)
    return handler


def _roots_only(root, roots: set, flat: dict, flat_ids) -> dict | None:
    """{id: elements} of the parameters the model (and the models it wraps) hold
    themselves, where no other module holds any; else None."""
    own: dict[int, int] = {}
    for m in root.modules():
        params = [p for p in m._parameters.values() if p is not None and id(p) not in flat_ids]
        if id(m) not in roots:
            if params or id(m) in flat:
                return None
            continue
        own.update((id(p), p.numel()) for p in params)
    return own or None


def _flat_numels(root) -> tuple[dict[int, int], frozenset]:
    """({id(module): elements FSDP's flat parameters hold for it, unsharded}, the flat
    parameters' ids); nothing where FSDP was never imported."""
    flat_param = sys.modules.get("torch.distributed.fsdp._flat_param")
    if flat_param is None:
        return {}, frozenset()
    out: dict[int, int] = {}
    flats = {id(p): p for p in root.parameters() if isinstance(p, flat_param.FlatParameter)}
    for p in flats.values():
        for info, n in zip(p._param_infos, p._numels):
            out[id(info.module)] = out.get(id(info.module), 0) + int(n)
    return out, frozenset(flats)


def _wrapper_chain(root) -> set[int]:
    """ids of `root` and of the modules it wraps, one inside the other (DDP's and FSDP's
    `.module`, FSDP's `_fsdp_wrapped_module`, torch.compile's `_orig_mod`): accelerate wraps
    the innermost model's forward, whose pre-hook runs before its autocast - FSDP without a
    wrap policy keeps every parameter there, and the run read as fp32, "partial"."""
    out, module = {id(root)}, root
    while True:
        inner = next((m for m in (getattr(module, name, None) for name in
                                  ("module", "_fsdp_wrapped_module", "_orig_mod"))
                      if isinstance(m, torch.nn.Module) and id(m) not in out), None)
        if inner is None:
            return out
        out.add(id(inner))
        module = inner
