"""`memprof run --step-on WHAT`: what ends a training step, when the default (an optimizer
step, else a change of the parameters after a backward) does not fit the script.

- `optimizer`, `backward`: track(step_on=...) (record.steps);
- a function: a step ends each time it returns (also by an exception). `NAME` is a function or
  method defined in the script (`train_step`, `Trainer.training_step`, `main.train_step` for
  one defined inside main()); `MODULE:NAME` one importable from the script's directory
  (`mylib.loop:train_step`), patched on its module or class for the run and restored after.

A function of the script cannot be patched before the script defines it, so its body is
wrapped, in the compiled script only, in `try: ... finally: <end the step>`: the same lines,
frames and tracebacks; the file on disk is not touched.

Either way the step ends through this module's `script_step_end`, which install() points at
the run's tracker: a process the script starts (cli/spawned) points it at its own tracker
(install_in_process), and where it was spawned rather than forked - the script imported
afresh, nothing wrapped - first swaps the function's code for the wrapped code.
"""
from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os
import sys
from types import CodeType

from ..record.patches import PatchRegistry
from .base import UsageError

KEYWORDS = ("optimizer", "backward")
HELP = ("what ends a training step: 'optimizer' (each optimizer.step()), 'backward' (each "
        "backward call), or a function - NAME defined in the script (train_step, "
        "Trainer.training_step) or MODULE:NAME importable from the script's directory "
        "(mylib.loop:train_step) - a step ending each time it returns. Default (auto): optimizer "
        "steps, else a change of the parameters after a backward. prof.step() in the script "
        "also ends a step.")


def track_mode(spec: str | None) -> str:
    """The track(step_on=...) value for a --step-on value."""
    if spec is None:
        return "auto"
    return spec if spec in KEYWORDS else "manual"


def install(spec: str | None, code: CodeType, source: bytes, script: str,
            end_step, patches: PatchRegistry) -> CodeType:
    """Make `spec` (a function) call end_step() when it returns; returns the code to run."""
    if spec is None or spec in KEYWORDS:
        return code
    patches.set(sys.modules[__name__], "script_step_end", end_step)
    if _importable(spec, script):
        _patch_importable(spec, patches)
        return code
    spec = spec.partition(":")[2] or spec     # SCRIPT:NAME is a function of the script
    return _wrap_script_function(spec, source, script)[0]


def script_step_end() -> None:
    """What the wrapped script function calls when it returns: the tracker's step() while
    `memprof run` runs the script (install() sets it), nothing otherwise."""


_NO_STEP_END = script_step_end


def _end_step() -> None:
    sys.modules[__name__].script_step_end()


def _importable(spec: str, script: str) -> bool:
    """MODULE:NAME of a module other than the script (SCRIPT:NAME is the script's own)."""
    module_name, colon, _ = spec.partition(":")
    return bool(colon) and module_name != os.path.splitext(os.path.basename(script))[0]


def install_in_process(spec: str | None, script: str, end_step) -> bool:
    """In a process the script started (cli/spawned), before its work runs: make `spec` end
    this process's steps (`end_step`); whether it does. A forked process has the parent's
    wrapping already, pointed at the parent's tracker: it is pointed here. A spawned one
    imported the script and its modules afresh, and every name for the function (the
    script's, another module's `from ... import`, a Process's bound run()) was bound before
    this ran: the function's own code is swapped for the wrapped one, compiled from its
    source as the parent compiles it. A function nested in another is out of reach there
    (False: its steps are found as without --step-on). Nothing is restored: the process
    ends with it."""
    if spec is None or spec in KEYWORDS:
        return False
    this = sys.modules[__name__]
    forked = this.script_step_end is not _NO_STEP_END
    this.script_step_end = end_step
    if forked:
        return True
    module_name, colon, qualname = spec.partition(":")
    try:   # (any failure - a file edited since, the user's import raising - loses the steps)
        if _importable(spec, script):
            owner = importlib.import_module(module_name)
            func = _function_at(owner, qualname)
            if func is None:
                return False
            try:
                swapped = "<" not in func.__qualname__ and \
                    _swap_code(func, func.__qualname__, func.__code__.co_filename)
            except Exception:  # noqa: BLE001  (its file edited since, or no source)
                swapped = False
            if not swapped:   # (a lambda, say): the module's name for it, at least
                _patch(owner, qualname, spec, PatchRegistry())
            return True
        main = sys.modules.get("__mp_main__") or sys.modules.get("__main__")
        return _swap_code(None, qualname if colon else spec, script, root=main)
    except Exception:  # noqa: BLE001
        return False


def _swap_code(func, qualname: str, filename: str, root=None) -> bool:
    """Give `func` (or the function `qualname` of module `root`, resolved as the parent
    resolves it) the wrapped code compiled from `filename`; whether it could."""
    with open(filename, "rb") as f:
        source = f.read()
    code, qualname = _wrap_script_function(qualname, source, filename)
    func = _function_at(root, qualname) if func is None else func
    wrapped = _code_of(code, func) if func is not None else None
    if wrapped is None:
        return False
    func.__code__ = wrapped
    return True


def _lookup(root, qualname: str) -> tuple[object, str, object, object]:
    """(the module or class that holds `qualname`, its last name, the attribute as stored,
    the function under a staticmethod or classmethod); None where missing."""
    owner = root
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part, None)
    raw = inspect.getattr_static(owner, name, None) if owner is not None else None
    return owner, name, raw, raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw


def _function_at(root, qualname: str):
    """The function `qualname` of a module (a method of a class of it: static, class or
    plain), under its decorators, or None."""
    func = _lookup(root, qualname)[3]
    func = inspect.unwrap(func) if callable(func) else func
    return func if inspect.isfunction(func) else None


def _code_of(module_code: CodeType, func) -> CodeType | None:
    """The code object compiled for `func` (same name, first line and free variables) among
    those of a module's code."""
    want = func.__code__
    todo = [module_code]
    while todo:
        for const in todo.pop().co_consts:
            if isinstance(const, CodeType):
                if (const.co_name, const.co_firstlineno, const.co_freevars) == \
                        (want.co_name, want.co_firstlineno, want.co_freevars):
                    return const
                todo.append(const)
    return None


def _patch_importable(spec: str, patches: PatchRegistry) -> None:
    module_name, _, qualname = spec.partition(":")
    if not module_name or not qualname:
        raise UsageError(f"--step-on {spec!r}: expected MODULE:NAME, e.g. mylib.loop:train_step")
    try:
        owner = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001  (any failure of the user's import is bad input)
        raise UsageError(f"--step-on {spec!r}: cannot import {module_name!r}: "
                         f"{type(err).__name__}: {err}") from None
    _patch(owner, qualname, spec, patches)


def _patch(owner, qualname: str, spec: str, patches: PatchRegistry) -> None:
    """The function `qualname` of module `owner` (or a method of a class of it), ending a step
    each time it returns."""
    module_name = getattr(owner, "__name__", "?")
    owner, name, raw, func = _lookup(owner, qualname)
    if not inspect.isfunction(func):
        raise UsageError(f"--step-on {spec!r}: {qualname!r} in {module_name} is not a "
                         f"function (found {type(raw).__name__})")
    _refuse_generator(spec, inspect.isgeneratorfunction(func)
                      or inspect.isasyncgenfunction(func))

    if inspect.iscoroutinefunction(func):   # the step ends when the coroutine does
        @functools.wraps(func)
        async def ends_step(*args, **kwargs):
            try:
                return await func(*args, **kwargs)
            finally:
                _end_step()
    else:
        @functools.wraps(func)
        def ends_step(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            finally:
                _end_step()
    patches.set(owner, name, type(raw)(ends_step) if func is not raw else ends_step)


def _refuse_generator(spec: str, generator: bool) -> None:
    if generator:
        raise UsageError(f"--step-on {spec!r}: is a generator; name the function that runs "
                         "one training step")


class _Functions(ast.NodeVisitor):
    """Function definitions of a module by qualified name, `<locals>` left out."""

    def __init__(self):
        self.found: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
        self._path: list[str] = []

    def _visit_scope(self, node) -> None:
        self._path.append(node.name)
        if not isinstance(node, ast.ClassDef):
            self.found.setdefault(".".join(self._path), node)
        self.generic_visit(node)
        self._path.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _visit_scope


def _wrap_script_function(spec: str, source: bytes, script: str) -> tuple[CodeType, str]:
    """The module's code with the function `spec` (a qualified name, or its last parts)
    wrapped; and its qualified name."""
    tree = ast.parse(source, script)
    finder = _Functions()
    finder.visit(tree)
    matches = [q for q in finder.found if q == spec or q.endswith("." + spec)]
    if spec in finder.found:
        matches = [spec]
    if len(matches) != 1:
        known = ", ".join(sorted(finder.found)) or "none"
        what = "several functions match" if matches else "no function of that name"
        hint = "or use MODULE:NAME for one importable elsewhere"
        if spec == "manual":   # track()'s value: its steps are prof.step() calls
            hint = ("'manual' is track(step_on=)'s value for steps that prof.step() ends, and "
                    "the script has no prof of the run's; name the function that runs one "
                    "step, or use optimizer or backward")
        raise UsageError(f"--step-on {spec!r}: {what} in {script} (functions there: {known}); "
                         + hint)
    node = finder.found[matches[0]]
    _refuse_generator(spec, any(isinstance(n, (ast.Yield, ast.YieldFrom))
                                for n in _own_nodes(node)))
    body = node.body
    doc = body[:1] if (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                       and isinstance(body[0].value.value, str)) else []
    hook = ast.copy_location(ast.parse(f"__import__({__name__!r}, fromlist=['_'])"
                                       ".script_step_end()").body[0], body[-1])
    wrapped = ast.Try(body=body[len(doc):] or [ast.Pass()], handlers=[], orelse=[],
                      finalbody=[hook])
    node.body = doc + [ast.copy_location(wrapped, body[-1] if doc and len(body) == 1
                                         else body[len(doc)])]
    return compile(ast.fix_missing_locations(tree), script, "exec",   # (no future flags of
                   dont_inherit=True), matches[0]                       # this module's)


def _own_nodes(func):
    """The nodes of a function's body, not those of functions or classes nested in it."""
    todo = list(func.body)
    while todo:
        n = todo.pop()
        yield n
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(n))
