"""Who holds a tensor: the shortest Python path from named roots (the model, the frame that ran
the block, a script's namespace) to it - `model.blocks[3].attn.history[11]`."""
from __future__ import annotations

import collections
import functools
import gc
import types
from inspect import CO_OPTIMIZED

import torch

MAX_HOLDER_OBJECTS = 200_000    # objects visited while searching for holders
MAX_HOLDER_DEPTH = 8

_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()).keys())
#: a module's hook tables whose hooks may hold what they captured
_CAPTURING_HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks",
                "_backward_hooks")
ATOMS = (str, bytes, int, float, complex, bool, type(None), types.FunctionType,
         types.BuiltinFunctionType, types.MethodType, types.ModuleType, type, range, slice,
         torch.dtype, torch.device, torch.Size)

def _is_atom(obj) -> bool:
    """Objects a holder search does not enter; closures are entered (through the variables
    they captured, never their globals), since a closure kept in a list keeps its tensors."""
    if isinstance(obj, types.FunctionType):
        return not obj.__closure__
    return isinstance(obj, ATOMS)


def _children(obj, path: str):
    """(path, child) pairs of the containers a holder search goes through."""
    if isinstance(obj, types.FunctionType):
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
            try:
                yield f"{path}.<closure {name}>", cell.cell_contents
            except ValueError:   # an empty cell
                continue
        return
    if isinstance(obj, functools.partial):
        for i, v in enumerate(obj.args):
            yield f"{path}.<partial arg {i}>", v
        for k, v in obj.keywords.items():
            yield f"{path}.<partial {k}>", v
        return
    if isinstance(obj, torch.nn.Module):
        for name, child in obj._modules.items():
            if child is not None:
                yield f"{path}.{name}", child
        for name, val in vars(obj).items():
            if name not in _MODULE_INTERNALS:
                yield f"{path}.{name}", val
        for table in _CAPTURING_HOOK_TABLES:   # a hook's closure keeping outputs in a list
            for key, hook in getattr(obj, table, {}).items():
                yield f"{path}.{table}[{key}]", hook
    elif isinstance(obj, (list, tuple, collections.deque)):
        for i, v in enumerate(obj):
            yield f"{path}[{i}]", v
    elif isinstance(obj, dict):
        for k, v in obj.items():
            key = repr(k) if isinstance(k, (str, int, float, tuple)) else f"<{type(k).__name__}>"
            yield f"{path}[{key}]", v
    elif isinstance(obj, (set, frozenset)):
        for v in obj:
            yield f"{path}{{...}}", v
    elif hasattr(obj, "__dict__") and not isinstance(obj, ATOMS):
        try:
            items = list(vars(obj).items())
        except TypeError:
            return
        for name, val in items:
            yield f"{path}.{name}", val


def reachable_tensors(roots: list[tuple[str, object]]):
    """Breadth-first from named roots: (shortest path, tensor) for each tensor reached, in
    order of distance (bounded: MAX_HOLDER_OBJECTS objects, MAX_HOLDER_DEPTH deep)."""
    seen: set[int] = set()
    queue = collections.deque((p, o, 0) for p, o in roots)
    visited = 0
    while queue and visited < MAX_HOLDER_OBJECTS:
        path, obj, depth = queue.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        visited += 1
        if isinstance(obj, torch.Tensor):
            yield path, obj
            continue
        if _is_atom(obj) or depth >= MAX_HOLDER_DEPTH:
            continue
        for child_path, child in _children(obj, path):
            if id(child) not in seen and not _is_atom(child):
                queue.append((child_path, child, depth + 1))


def find_holders(roots: list[tuple[str, object]], targets: set[int]) -> dict[int, str]:
    """The shortest path from named roots to each target tensor: id -> path."""
    found: dict[int, str] = {}
    if not targets:
        return found
    for path, t in reachable_tensors(roots):
        if id(t) in targets:
            found[id(t)] = path
            if len(found) == len(targets):
                break
    return found


def describe_unreached(t: torch.Tensor) -> str:
    """One hop through the garbage collector for a tensor no named root reaches."""
    refs = [r for r in gc.get_referrers(t) if not isinstance(r, types.FrameType)]
    kinds = sorted({type(r).__name__ for r in refs})
    return f"a {', '.join(kinds) or 'C++ object'} not reachable from the model or the tracked frame"


def frame_roots(frame) -> list[tuple[str, object]]:
    """Named roots from a frame: the one that ran the `with memprof.track()` block, or one
    on the training loop's stack (record.leak_probe)."""
    if frame is None:
        return []
    code = frame.f_code
    scope = "" if code.co_name == "<module>" else f"{code.co_name}.<locals>."
    local_vars = frame.f_locals
    roots = [(f"{scope}{k}", v) for k, v in local_vars.items()]
    if code.co_flags & CO_OPTIMIZED and type(local_vars) is dict:
        # A function's frame (Python < 3.13) keeps this snapshot of its variables: left
        # there, it would hold what they name now after the function rebinds or deletes them
        # (a tensor the user frees after the block, a step's loss). Emptied: a tracer or
        # debugger refreshes it from the variables before it reads it, so nothing is lost.
        local_vars.clear()
    if scope:
        roots += namespace_roots(f"{frame.f_globals.get('__name__', 'globals')}.",
                                 frame.f_globals)
    return roots


def namespace_roots(prefix: str, namespace: dict) -> list[tuple[str, object]]:
    """Named roots from a namespace dict (a script's globals)."""
    return [(f"{prefix}{k}", v) for k, v in namespace.items()
            if not k.startswith("__") and not _is_atom(v)]
