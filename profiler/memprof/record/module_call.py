"""Which submodule runs, through `torch.nn.Module.__call__` replaced on the class for a block.

A pair of forward hooks per submodule sent every call down torch's slow path through
`_call_impl` (~3x the cost of the call itself on an op-bound step); one Python frame around
the call does not. On the class, not the instance: nothing of a module changes (copies of its
`__dict__`, a staticmethod or patched forward, pickling, `type(m) is nn.Linear`,
TorchScript), and a module the block did not name (a copy, the loss, another model) passes
straight through. The scope is around the whole call, so what a module's own hooks allocate
(an unshard, an adapter) is the module's. The model's own calls (its forward passes) go
through it too, with no hook on the model: a model under memprof can be scripted, a
ScriptModule tracked, and a function that torch.compile compiled over the model is not
compiled again for each block (dynamo guarded on the block's new hooks). Auto mode (`memprof
run`), which names modules as they run, takes every call the same way, instead of global
module hooks that sent every module of the process down the slow path.

One function for every block, reading module-level tables: dynamo inlines it (a new function
per block, or a table it read while tracing, would make it compile a model again in each
block), and runs it as its own frame never (`skip_code`: `torch.compile(module)` inside a
block binds the module's `__call__`, this function, as the frame to compile; every module so
compiled shared one recompile budget, and past 8 ran uncompiled for good).
"""
from __future__ import annotations

import importlib
import sys
import types

import torch

from .. import _C

# True while dynamo traces (it reads the call as a constant) and while torch.export runs the
# forward non-strict (with fake tensors, where a hook's reads would pin symbolic sizes)
compiling = torch.compiler.is_compiling
# The same check on the per-call paths (every module call, each pass's start and end), read
# in two parts: is_compiling calls torch.jit.is_scripting first, two Python frames per check
# where is_dynamo_compiling is one, and non-strict export's flag is an attribute read. (Under
# dynamo the first part is a constant True and the second is never read.)
if hasattr(torch.compiler, "is_dynamo_compiling") and \
        hasattr(torch.compiler, "_is_compiling_flag"):
    dynamo_compiling, export_flag = torch.compiler.is_dynamo_compiling, torch.compiler
else:   # another torch: the whole check, and a flag that is never set
    dynamo_compiling, export_flag = compiling, types.SimpleNamespace(_is_compiling_flag=False)

scoped_ids: dict[int, int] = {}     # id(module) -> module id (or PASS), for the block running
#: in scoped_ids: the module's calls are forward passes of the model, run by the block's
#: pass handler fn(module, args, kwargs) (its phase, markers and inputs; ModuleScope)
PASS = -1
_pass_handler: list = [None]
#: auto mode's handler of every other call, fn(module, args, kwargs): it names what runs
_other_handler: list = [None]
_original = [torch.nn.Module.__call__]   # what the block replaced
_reaches_us: list = [None]   # a __call__ set over ours during a block and left there: it calls us
#: a module call was traced by dynamo (or run by non-strict export) since the block began: a
#: global store, which dynamo replays after each run of what it compiled (no guard, no break)
traced = False


def _tracing_a_subgraph() -> bool:
    """True while dynamo traces the body of a higher-order op (a checkpointed function, cond's
    branches), where it refuses a store to a global (a graph break; under fullgraph=True an
    error in the user's program). Dynamo calls this while tracing and bakes the result in (no
    guard): there the flag is set right away, at trace time, instead of by a replayed store
    (also when the body then fails to compile and runs eagerly: its modules did run inside
    what torch.compile was given). Dynamo keeps the baked result as a global of the traced
    frame's module (a name of memprof's in the user's module, as for any constant result)."""
    global traced
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        inside = InstructionTranslator.current_tx().output.current_tracer.parent is not None
    except Exception:  # noqa: BLE001  (not under dynamo: non-strict export; another torch)
        return False
    if inside:
        traced = True
    return inside


# what torch.compiler.assume_constant_result marks, without importing dynamo with memprof
_tracing_a_subgraph._dynamo_marked_constant = True


def module_call(module, /, *args, **kwargs):
    # (`module` positional-only: a keyword argument of that name is the callee's)
    if dynamo_compiling() or export_flag._is_compiling_flag:   # traced, not run
        if not _tracing_a_subgraph():
            global traced
            traced = True
        return _original[0](module, *args, **kwargs)
    mid = scoped_ids.get(id(module))
    if mid is None or mid == PASS:
        # (a handler read once: another thread's block may be ending)
        handler = _other_handler[0] if mid is None else _pass_handler[0]
        if handler is None:
            return _original[0](module, *args, **kwargs)
        return handler(module, args, kwargs)
    _C.push_module(mid)
    try:
        return _original[0](module, *args, **kwargs)
    finally:
        _C.pop_module()


def call_through(module, args, kwargs):
    """The call module_call stands in front of (a pass handler's)."""
    return _original[0](module, *args, **kwargs)


def call_in_scope(mid: int, module, args, kwargs):
    """The call, with module `mid` running (a handler's call that is no pass: on another
    thread). module_call itself does the same inline: a frame fewer on every call."""
    _C.push_module(mid)
    try:
        return _original[0](module, *args, **kwargs)
    finally:
        _C.pop_module()


def install(ids: dict[int, int], patches, pass_handler=None, other_handler=None) -> None:
    """Scope the calls of the modules in `ids` (id(module) -> module id, or PASS: a call of
    `pass_handler(module, args, kwargs)`), and hand every other call to `other_handler` (auto
    mode), until remove()."""
    global traced
    traced = False
    scoped_ids.update(ids)
    _pass_handler[0] = pass_handler
    _other_handler[0] = other_handler
    skip_own_frame()
    current = torch.nn.Module.__call__
    if current is module_call or current is _reaches_us[0]:
        return   # ours already, or a wrapper around ours (replacing it would call itself)

    def replace(original):
        _original[0] = original
        return module_call
    patches.patch(torch.nn.Module, "__call__", replace)


def remove() -> None:
    scoped_ids.clear()
    _pass_handler[0] = _other_handler[0] = None


def after_restore() -> None:
    """Once the block's patches are undone: a `__call__` that someone set over ours during the
    block (a monkeypatch kept, a library's wrapper) calls ours and stays; the next block uses
    it as it is. Names that dynamo bound to `Module.__call__` while it was ours (imported for
    the first time inside the block) are the original again: dynamo calls a module's forward
    directly only where its `__call__` is that."""
    current = torch.nn.Module.__call__
    if current is not _original[0] and current is not module_call:
        _reaches_us[0] = current
    for name, mod in list(sys.modules.items()):
        if name.startswith("torch._dynamo") and mod is not None and \
                getattr(mod, "unpatched_nn_module_call", None) is module_call:
            mod.unpatched_nn_module_call = _original[0]


def load_dynamo() -> None:
    """Import dynamo (the first torch.compile in a block does) with torch's own
    Module.__call__ in place: dynamo binds it at import, and calls a module's forward directly,
    past module_call, where a module's __call__ is that (imported under module_call, it bound
    ours: it then went past module_call inside the block, where a compiled model was not seen,
    and kept ours after it)."""
    if "torch._dynamo" in sys.modules:
        return
    ours = torch.nn.Module.__call__
    torch.nn.Module.__call__ = _original[0]
    try:
        importlib.import_module("torch._dynamo")
    finally:
        torch.nn.Module.__call__ = ours


#: fn(*args) with dynamo's frame callback off on this thread, if it is on: memprof's own
#: bookkeeping (a pass's markers and naming, the optimizer hooks, the backward wrapper, and
#: the recorders' subscribers they call). Where compiled code falls back to eager (a graph
#: break: FSDP2's hooks, a compiled training step at backward), dynamo goes on compiling
#: every frame the fallback calls, ours included - each broke again at memprof._C and left a
#: warning. The user's frames (the model's forward, backward itself) are called outside. In
#: C (csrc/outside_dynamo.cpp): ~6 calls a step, each a cold Python frame as a function here;
#: it reads the callback through the functions skip_own_frame gives it once dynamo is loaded.
outside_dynamo = _C.outside_dynamo


def break_graph_if_traced() -> None:
    """In one of memprof's hooks that dynamo may meet while it traces a compiled step (the
    optimizer hooks, the backward wrapper): the graph breaks at the hook's call, cleanly, and
    the hook then runs eagerly as itself (never_compiled). A break of dynamo's own making at
    memprof._C did the same, with a warning for each. (The per-step hooks write the same two
    lines inline: a frame fewer at each.)"""
    if dynamo_compiling():
        torch._dynamo.graph_break()


def skip_own_frame() -> None:
    """Dynamo never compiles module_call, call_through or the block's handlers as frames of
    their own (it still inlines module_call): done once dynamo is loaded, at each block's
    start and after each torch.compile in a block (torch._dynamo.reset() forgets it). Where
    dynamo leaves torch's own frames to run (a Sequential compiled in place), the next frame
    it met was a handler, compiled on its own, and broke its graph at memprof._C."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    skip = getattr(eval_frame, "skip_code", None)
    if skip is None:
        return
    frames = sys.modules.get("torch._C._dynamo.eval_frame")
    if hasattr(frames, "get_eval_frame_callback") and hasattr(frames, "set_eval_frame"):
        _C.set_frame_callback(frames.get_eval_frame_callback, frames.set_eval_frame)
    for fn in (module_call, call_through, call_in_scope, _pass_handler[0], _other_handler[0],
               break_graph_if_traced):
        code = _code_of(fn)
        if code is not None:
            skip(code)
    for code in _entry_points:
        skip(code)


def _code_of(fn):
    return getattr(getattr(fn, "__func__", fn), "__code__", None)


#: the code of memprof's other functions that the user's code (or torch's) calls while a
#: block records: optimizer hooks, the backward wrapper (never_compiled)
_entry_points: list = []


def never_compiled(*fns) -> None:
    """Dynamo never compiles these as frames of their own, as module_call: called where a
    compiled region fell back to eager code (after a graph break: a compiled training step's
    backward, torch.optim's own break in a compiled optimizer step), dynamo compiled each one
    on its own, broke its graph at memprof._C, and traced a function that steps aside while
    dynamo traces into a compiled frame that did nothing at run time."""
    new = [c for c in map(_code_of, fns) if c is not None and c not in _entry_points]
    if new:
        _entry_points.extend(new)
        skip_own_frame()
