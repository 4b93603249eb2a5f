"""torch's tables of functions that are built once, on first use, and cached: torch.overrides'
lists and dynamo's rule map and handlers. One first built while a block ran (a torch.compile in
it) took memprof's wrapper where torch's function stood (torch.autograd.grad, torch.compile,
the collectives): after the block, dynamo had no handler for the real function, and the
wrapper's closure held the session - and the run's model and data - for the rest of the
process. So did torch's modules first imported in the block: their names bound to a function
(`from torch.distributed import all_reduce as legacy_allreduce`) and their tables of them
(dynamo's remaps of the collectives). Once a block's patches are undone, `put_back` puts the
originals there. So do a user's modules first imported in the block (a loop that imports
its helpers lazily): their names (`from torch.autograd import grad`), not what those hold.

Another library's wrapper of memprof's wrapper (functools.wraps, made while the block ran) is
not memprof's to unwrap: what it calls is in its closure. Where it says what it wraps
(`__wrapped__`, as inspect.unwrap and dynamo read it), that names torch's function again;
the call still goes through memprof's wrapper, which holds its session weakly and passes
through once its block has ended (record.auto_steps, record.steps)."""
from __future__ import annotations

import sys
from types import FunctionType

#: (module, the cached function's qualified name): each takes no argument and returns a dict,
#: set or list of functions, or a tuple of those (dicts of lists: torch.overrides')
TABLES = (
    ("torch.overrides", "get_ignored_functions"),
    ("torch.overrides", "get_default_nowrap_functions"),
    ("torch.overrides", "get_testing_overrides"),
    ("torch.overrides", "_get_overridable_functions"),
    ("torch.overrides", "_get_tensor_methods"),
    ("torch._dynamo.trace_rules", "get_torch_obj_rule_map"),
    ("torch._dynamo.variables.torch", "get_overridable_functions"),
    ("torch._dynamo.variables.torch", "TorchInGraphFunctionVariable._get_handlers"),
)


def put_back(originals: dict[int, tuple[object, object]], modules=()) -> None:
    """In each table already built (none is built here) and in the namespaces of `modules`
    (and their dicts, lists and sets): every wrapper in `originals` (id(wrapper) ->
    (wrapper, original)) replaced by its original."""
    if not originals:
        return
    originals = {key: (wrapper, _first(original, originals))
                 for key, (wrapper, original) in originals.items()}
    for module, qualname in TABLES:
        cached = _built(module, qualname)
        if cached is None:
            continue
        try:
            _replace_in(cached(), originals, depth=2)
        except Exception:  # noqa: BLE001  (another torch's shape: left as it is)
            continue
    for module in list(modules):
        # one another thread is importing (its dict changing size as it is read), or an odd
        # object in sys.modules, is passed over: its wrappers pass through once the block
        # ended, and the rest of the block's uninstall must still run
        try:
            namespace = getattr(module, "__dict__", None)
            if isinstance(namespace, dict):   # (a user's: its names, not its data's insides)
                name = getattr(module, "__name__", None)
                torch = isinstance(name, str) and name.startswith("torch")
                _replace_in(namespace, originals, depth=1 if torch else 0)
        except Exception:  # noqa: BLE001
            continue


def _first(original, originals: dict):
    """torch's own function under wrappers of wrappers (the compile watch's around the module
    scope's torch.compile: the table took the outer one)."""
    seen = 0
    while _original(original, originals) is not None and seen < len(originals):
        original, seen = _original(original, originals), seen + 1
    return original


def _built(module: str, qualname: str):
    """The cached function, where its module is loaded and its table built; else None."""
    obj = sys.modules.get(module)
    for name in qualname.split("."):
        obj = getattr(obj, name, None)
    info = getattr(obj, "cache_info", None)
    try:
        return obj if info is not None and info().currsize else None
    except Exception:  # noqa: BLE001
        return None


def _original(item, originals: dict):
    """The original of a wrapper in `originals`, else None."""
    found = originals.get(id(item))
    return found[1] if found is not None and found[0] is item else None


def _rewrap(item, originals: dict) -> bool:
    """A foreign function wrapping one of memprof's wrappers (functools.wraps): its
    `__wrapped__` set to torch's function -> whether it was one."""
    if type(item) is not FunctionType:   # (no other object's __getattr__ runs here)
        return False
    original = _original(item.__dict__.get("__wrapped__"), originals)
    if original is None:
        return False
    item.__wrapped__ = original
    return True


def _replace_in(table, originals: dict, depth: int) -> None:
    if isinstance(table, dict):
        for key in [k for k in list(table) if _original(k, originals) is not None]:
            table.setdefault(_original(key, originals), table.pop(key))
        for key, value in list(table.items()):
            original = _original(value, originals)
            if original is not None:
                table[key] = original
            elif not _rewrap(value, originals) and depth:
                _replace_in(value, originals, depth - 1)
    elif isinstance(table, set):
        items = list(table)   # (a snapshot: another thread may add to it)
        for item in items:
            _rewrap(item, originals)
        for item in [x for x in items if _original(x, originals) is not None]:
            table.discard(item)
            table.add(_original(item, originals))
    elif isinstance(table, list):
        for i, item in enumerate(list(table)):
            original = _original(item, originals)
            if original is not None:
                table[i] = original
            else:
                _rewrap(item, originals)
    elif isinstance(table, tuple) and depth:
        for item in table:
            _replace_in(item, originals, depth - 1)
