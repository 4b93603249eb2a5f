"""Who holds a tensor: the shortest Python path from named roots (the model, the frame that ran
the block, a script's namespace) to it - `model.blocks[3].attn.history[11]`."""
from __future__ import annotations

import collections
import functools
import gc
import os
import sys
import sysconfig
import types
from inspect import CO_OPTIMIZED

import torch

MAX_HOLDER_OBJECTS = 200_000    # objects visited while searching for holders
# a hook's list on a T5 attention projection is 10 hops from the model
# (model.encoder.block[0].layer[0].SelfAttention.q.debug_outputs[i]); the object bound
# above keeps the walk's cost
MAX_HOLDER_DEPTH = 12

#: where code that is not the user's lives: the standard library, installed packages (as
#: configured and as resolved, so that a module's own path is compared without a syscall)
_LIBRARY_DIRS = tuple({d + os.sep for k in ("stdlib", "platstdlib", "purelib", "platlib")
                       for d in (os.path.abspath(sysconfig.get_paths()[k]),
                                 os.path.realpath(sysconfig.get_paths()[k]))})
#: module name -> (its __file__, whether it is the user's): a look asks for every module of
#: the process (thousands with torch) and every class it meets
_USER_CODE: dict[str, tuple[object, bool]] = {}
#: (len(sys.modules) when listed, the user's modules then): a look runs at many step ends
_USER_MODULES: tuple[int, list[str]] = (-1, [])
#: memprof itself and torch, wherever they are installed from (an editable install)
_NOT_USER_PACKAGES = frozenset({__name__.split(".")[0], "torch"})

_OWN_PREFIX = __name__.split(".")[0] + "."
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()).keys())
#: a module's hook tables whose hooks may hold what they captured
_CAPTURING_HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks",
                "_backward_hooks")
ATOMS = (str, bytes, int, float, complex, bool, type(None), types.FunctionType,
         types.BuiltinFunctionType, types.MethodType, types.ModuleType, type, range, slice,
         torch.dtype, torch.device, torch.Size)

#: where torch's and memprof's own code lives (an editable install included)
_LIBRARY_CODE_DIRS = tuple(os.path.dirname(m.__file__) + os.sep
                           for m in (torch, sys.modules[__name__.split(".")[0]]))


def is_library_frame(frame) -> bool:
    """A frame of torch's or memprof's own code (or of the interpreter's frozen modules)."""
    name = frame.f_code.co_filename
    return name.startswith(_LIBRARY_CODE_DIRS) or name.startswith("<frozen")


def loop_frame(start):
    """The innermost frame outside torch and memprof (the training loop's), or None."""
    f = start
    while f is not None and is_library_frame(f):
        f = f.f_back
    return f


def name_in_frame(frame, obj) -> str | None:
    """The name a frame calls `obj` by: one of its variables, an attribute of its `self`
    (a trainer's `self.discriminator`), or a global of its module - `D` for `D(fake)`. None
    when it has none, or looking raised (a `self` with an odd `__getattr__`)."""
    try:
        local_vars = frame.f_locals
        found = next((k for k, v in local_vars.items() if v is obj and k.isidentifier()), None)
        owner = local_vars.get("self")
        del local_vars
        release_locals_snapshot(frame)
        if found is None and isinstance(owner, torch.nn.Module) and owner is not obj:
            found = next((k for k, v in owner._modules.items() if v is obj), None)
        if found is None and owner is not None and owner is not obj:
            found = next((k for k, v in (getattr(owner, "__dict__", None) or {}).items()
                          if v is obj and isinstance(k, str) and k.isidentifier()), None)
        if found is None:
            found = next((k for k, v in frame.f_globals.items()
                          if v is obj and isinstance(k, str) and k.isidentifier()), None)
        return found
    except Exception:  # noqa: BLE001  (a name is a nicety; the user's call goes on)
        return None


def container_in_frame(frame, module) -> torch.nn.Module | None:
    """The outermost Sequential or ModuleList among a frame's variables and its module's
    globals that holds `module` (`model` for `model[0](x)`, a loop calling a Sequential's
    layers one by one), or None. Not any module: a ModuleDict kept beside the loop
    (`{"teacher": t, "student": s}`) or a wrapper the loop does not call (`WithLoss(model)`)
    is no model of the layers'. `self` is left out: a LightningModule's `self.encoder(x)` keeps
    its own name. Walks each candidate's modules once, at a new root only."""
    try:
        local_vars = frame.f_locals
        candidates = [v for k, v in local_vars.items() if k != "self"]
        del local_vars
        release_locals_snapshot(frame)
        candidates += list(frame.f_globals.values())
        best, best_size = None, 0
        seen: set[int] = set()
        for v in candidates:
            if not isinstance(v, (torch.nn.Sequential, torch.nn.ModuleList)) or v is module \
                    or id(v) in seen:
                continue
            seen.add(id(v))
            subs = [id(m) for m in v.modules()]
            if id(module) in subs and len(subs) > best_size:
                best, best_size = v, len(subs)
        return best
    except Exception:  # noqa: BLE001  (a name is a nicety; the user's call goes on)
        return None


def release_locals_snapshot(frame) -> None:
    """Empty the dict a function's frame (Python < 3.13) keeps of its variables once
    `frame.f_locals` was read: left there, it holds what they named then after the function
    rebinds or deletes them (a tensor freed after the block, a step's loss). A tracer or
    debugger refreshes it before reading it. Left as it is when the function holds it
    itself (`hparams = locals()` is that dict: emptying it emptied the user's)."""
    if not frame.f_code.co_flags & CO_OPTIMIZED:
        return
    snapshot = frame.f_locals
    # references: the frame's, this name's, getrefcount's argument - and no one else's
    if type(snapshot) is dict and sys.getrefcount(snapshot) <= 3:
        snapshot.clear()


def is_user_code(module_name: str | None) -> bool:
    """Whether a module (by name, as `__module__` gives it) is the user's: loaded from a file
    outside the standard library and the installed packages (a script, `store.py` next to
    it, the project's own package)."""
    if not module_name or module_name.split(".")[0] in _NOT_USER_PACKAGES:
        return False
    if module_name == "__main__":
        return True
    path = getattr(sys.modules.get(module_name), "__file__", None)
    known = _USER_CODE.get(module_name)
    if known is None or known[0] != path:
        known = _USER_CODE[module_name] = (path, bool(path) and _outside_libraries(path))
    return known[1]


def _outside_libraries(path: str) -> bool:
    """A file outside the standard library and the installed packages."""
    return not os.path.abspath(path).startswith(_LIBRARY_DIRS)


def _is_atom(obj) -> bool:
    """Objects a holder search does not enter. Functions are entered through what they keep
    (the variables a closure captured, default arguments: `lambda o=out: ...`), never their
    globals; the user's own classes through their attributes (`MetricLogger.history = []`),
    since a list kept there keeps its tensors."""
    if isinstance(obj, types.FunctionType):
        return not (obj.__closure__ or obj.__defaults__ or obj.__kwdefaults__)
    if isinstance(obj, type):
        return not is_user_code(getattr(obj, "__module__", None))
    if isinstance(obj, ATOMS):
        return True
    # memprof's own machinery (a tracker, its session and scope): it reaches the model only
    # because it tracks it - `memprof run`'s frame named holders `_run_script.<locals>.tracker.
    # session.scope...`. Its built-in models are modules like any other, and entered.
    return type(obj).__module__.startswith(_OWN_PREFIX) and not isinstance(obj, torch.nn.Module)


def _slot_values(obj):
    """(name, value) of an object's __slots__ that are set."""
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name in ("__dict__", "__weakref__"):
                continue
            try:
                yield name, getattr(obj, name)
            except AttributeError:   # declared, never set
                continue


def _children(obj, path: str):
    """(path, child) pairs of the containers a holder search goes through."""
    if isinstance(obj, types.FunctionType):
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
            try:
                yield f"{path}.<closure {name}>", cell.cell_contents
            except ValueError:   # an empty cell
                continue
        code = obj.__code__
        positional = code.co_varnames[:code.co_argcount]
        for name, v in zip(positional[len(positional) - len(obj.__defaults__ or ()):],
                           obj.__defaults__ or ()):
            yield f"{path}.<default {name}>", v
        for name, v in (obj.__kwdefaults__ or {}).items():
            yield f"{path}.<default {name}>", v
        return
    if isinstance(obj, type):   # the user's class (see _is_atom): its own attributes
        for name, val in list(vars(obj).items()):
            if not name.startswith("__") and not isinstance(
                    val, (types.FunctionType, staticmethod, classmethod, property)):
                yield f"{path}.{name}", val
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
        for name, buf in obj._buffers.items():   # a buffer updated with autograd on
            if buf is not None:
                yield f"{path}.{name}", buf
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
    elif not isinstance(obj, ATOMS):
        try:
            items = list(vars(obj).items()) if hasattr(obj, "__dict__") else []
        except TypeError:
            items = []
        for name, val in items:
            yield f"{path}.{name}", val
        for name, val in _slot_values(obj):
            yield f"{path}.{name}", val


def reachable_tensors(roots: list[tuple[str, object]], bounds: dict | None = None):
    """Breadth-first from named roots: (shortest path, tensor) for each tensor reached, in
    order of distance (bounded: MAX_HOLDER_OBJECTS objects, MAX_HOLDER_DEPTH deep).
    `bounds`, when given, gets id(tensor) -> maxlen for a tensor reached through a bounded
    deque (`deque(maxlen=3)`: it keeps a few steps, it does not grow)."""
    seen: set[int] = set()
    queue = collections.deque((p, o, 0, None) for p, o in roots)
    visited = 0
    while queue and visited < MAX_HOLDER_OBJECTS:
        path, obj, depth, bound = queue.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        visited += 1
        if isinstance(obj, torch.Tensor):
            if bound is not None and bounds is not None:
                bounds[id(obj)] = bound
            yield path, obj
            continue
        if _is_atom(obj) or depth >= MAX_HOLDER_DEPTH:
            continue
        if isinstance(obj, collections.deque) and obj.maxlen is not None:
            bound = obj.maxlen if bound is None else min(bound, obj.maxlen)
        for child_path, child in _children(obj, path):
            if id(child) not in seen and not _is_atom(child):
                queue.append((child_path, child, depth + 1, bound))


def find_holders(roots: list[tuple[str, object]], targets: set[int],
                 bounds: dict | None = None) -> dict[int, str]:
    """The shortest path from named roots to each target tensor: id -> path (`bounds`: see
    reachable_tensors)."""
    found: dict[int, str] = {}
    if not targets:
        return found
    for path, t in reachable_tensors(roots, bounds):
        if id(t) in targets:
            found[id(t)] = path
            if len(found) == len(targets):
                break
    return found


def describe_unreached(t: torch.Tensor, own=()) -> str:
    """One hop through the garbage collector for a tensor no named root reaches. `own`: the
    scan's containers, which hold every tensor it judges (they read as 'a dict, list'). A
    custom autograd.Function that set its output on ctx (`ctx.out = out`) is named as such:
    the ctx is the output's own backward node, a cycle no name reaches."""
    on_ctx = ctx_attribute(t)
    if on_ctx is not None:
        return (f"{on_ctx} of {type(t.grad_fn)._forward_cls.__name__} (the output is kept on "
                "the ctx of the custom autograd.Function that made it: a reference cycle)")
    skip = {id(o) for o in own}
    refs = [r for r in gc.get_referrers(t)
            if not isinstance(r, types.FrameType) and id(r) not in skip]
    kinds = sorted({type(r).__name__ for r in refs})
    return f"a {', '.join(kinds) or 'C++ object'} not reachable from the model or the tracked frame"


def ctx_attribute(t: torch.Tensor) -> str | None:
    """'ctx.out' when the custom autograd.Function whose backward node made `t` keeps `t` as
    an attribute of its ctx (that node): else None."""
    node = t.grad_fn
    if not isinstance(node, torch.autograd.function.BackwardCFunction):
        return None
    try:
        name = next((k for k, v in vars(node).items() if v is t), None)
    except TypeError:
        return None
    return f"ctx.{name}" if isinstance(name, str) else None


def model_roots(model, named_roots) -> list[tuple[str, object]]:
    """Where holder names start first: the tracked model (`model.kept`), else the root
    modules that ran, as the code called them (auto mode: `memprof run`); and each of their
    submodules under its path from them, so that a module's list is named by the model even
    where a shorter alias reaches it (a loop variable left at the last block,
    `for b in model.blocks: b.attn.history = []`, named the second block's list
    `train.<locals>.b.attn.history`)."""
    roots = [("model", model)] if model is not None else list(named_roots)
    out = list(roots)
    for name, root in roots:
        if not isinstance(root, torch.nn.Module):
            continue
        try:
            subs = list(root.named_modules())
        except Exception:  # noqa: BLE001  (an odd module: its root alone still names)
            continue
        out += [(f"{name}.{path}", m) for path, m in subs if path]
    return out


def frame_roots(frame) -> list[tuple[str, object]]:
    """Named roots from a frame: the one that ran the `with memprof.track()` block, or one
    on the training loop's stack (record.leak_probe)."""
    if frame is None:
        return []
    code = frame.f_code
    scope = "" if code.co_name == "<module>" else f"{code.co_name}.<locals>."
    roots = [(f"{scope}{k}", v) for k, v in frame.f_locals.items()]
    release_locals_snapshot(frame)
    if scope:
        roots += namespace_roots(f"{frame.f_globals.get('__name__', 'globals')}.",
                                 frame.f_globals)
    return roots


def namespaces_roots(namespaces: list[tuple[str, dict]],
                     frame=None) -> list[tuple[str, object]]:
    """Named roots from extra namespaces ((prefix, dict): a script's globals), then from the
    user's other modules (`store.BUF` of a `store.py` the script imports) but those and
    `frame`'s globals (the frame's roots name them)."""
    roots = []
    for prefix, namespace in namespaces:
        roots += namespace_roots(prefix, namespace)
    searched = tuple(ns for _, ns in namespaces)
    if frame is not None:
        searched += (frame.f_globals,)
    return roots + user_module_roots(skip=searched)


def user_module_roots(skip: tuple = ()) -> list[tuple[str, object]]:
    """Named roots from the globals of the user's own modules, but those in `skip`
    (namespaces already searched). The script's own globals (`__main__`, also listed as
    `__mp_main__` once multiprocessing is imported) are named as the script names them
    (`Keeper.hist`), where the block was entered from another module's frame (a framework's
    callback)."""
    global _USER_MODULES
    if _USER_MODULES[0] != len(sys.modules):   # modules imported (or removed) since
        _USER_MODULES = (len(sys.modules), [n for n in list(sys.modules)
                                            if n != "__main__" and is_user_code(n)])
    main = sys.modules.get("__main__")
    roots = []
    if _is_users_main(main) and not any(main.__dict__ is d for d in skip):
        roots += namespace_roots("", main.__dict__)
    for name in _USER_MODULES[1]:
        module = sys.modules.get(name)
        namespace = getattr(module, "__dict__", None)
        if module is not main and namespace is not None and \
                not any(namespace is d for d in skip):
            roots += namespace_roots(f"{name}.", namespace)
    return roots


def _is_users_main(main) -> bool:
    """Whether `__main__` is the user's: a script or a notebook's namespace (no file), not a
    library's entry point run with `python -m` (its globals are the library's)."""
    if not isinstance(getattr(main, "__dict__", None), dict):
        return False
    path = getattr(main, "__file__", None)
    return not path or _outside_libraries(path)


def namespace_roots(prefix: str, namespace: dict) -> list[tuple[str, object]]:
    """Named roots from a namespace dict (a script's globals)."""
    return [(f"{prefix}{k}", v) for k, v in namespace.items()
            if not k.startswith("__") and not _is_atom(v)]
