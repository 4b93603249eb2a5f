"""What `memprof run` runs, found as Python finds it: a script (`python train.py`), a directory
with a `__main__.py` (`python app/`) or a module (`python -m pkg.train`, a package's
`__main__`), with the `__main__` module, `sys.argv[0]` and `sys.path[0]` Python gives each."""
from __future__ import annotations

import argparse
import builtins
import importlib.machinery
import importlib.util
import os
import sys
import types
import zipfile
import zipimport
from dataclasses import dataclass

from .base import UsageError


@dataclass
class RunTarget:
    name: str            # as the user gave it: messages, the default profile name
    filename: str        # the code's file, as tracebacks name it
    source: bytes
    argv0: str           # sys.argv[0]
    path0: str           # sys.path[0]
    spec: object = None  # the module's spec (`-m`), else None

    @property
    def is_module(self) -> bool:
        return self.spec is not None and self.spec.name != "__main__"

    @property
    def stem(self) -> str:
        """The default profile's name without its extension."""
        if self.is_module:
            return self.name
        return os.path.splitext(os.path.basename(os.path.normpath(self.name)))[0]

    def main_module(self) -> types.ModuleType:
        # the names python's __main__ has, in its order (a script that lists its globals)
        main = types.ModuleType("__main__")
        main.__package__ = getattr(self.spec, "parent", None)
        # a script has a loader and no spec, as under python (pkgutil and inspect read it)
        main.__loader__ = getattr(self.spec, "loader", None) or \
            importlib.machinery.SourceFileLoader("__main__", self.filename)
        main.__spec__ = self.spec
        if sys.version_info < (3, 14):   # (3.14 builds a module's annotations lazily)
            main.__annotations__ = {}
        main.__builtins__ = builtins
        main.__file__ = self.filename
        main.__cached__ = getattr(self.spec, "cached", None)
        return main

    def code_ended(self, main: types.ModuleType) -> None:
        """What python does once a script's code has ended (returned or raised; not by
        SystemExit, whose exit runs from inside): `__file__` and `__cached__` leave its
        `__main__`, before its threads are waited for and its atexit handlers run. A module,
        a directory or a zipapp (run through runpy) keeps them."""
        if self.spec is None:
            for name in ("__file__", "__cached__"):
                main.__dict__.pop(name, None)

    def orig_argv(self, args: list[str]) -> list[str]:
        """sys.orig_argv as `python [the interpreter options given] <this> args` gives it (a
        script that launches itself again from it started memprof's command line instead)."""
        given = list(getattr(sys, "orig_argv", None) or [sys.executable])
        program = ["-m", self.name] if self.is_module else [self.name]
        return given[:1] + interpreter_options(given[1:]) + program + list(args)


def interpreter_options(argv: list[str]) -> list[str]:
    """The interpreter's own options at the start of `argv` (sys.orig_argv past its first
    entry), up to the program it runs (`-m NAME`, `-c CODE`, a script's path: memprof's)."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--" or token == "-" or not token.startswith("-"):
            break
        if token.startswith("--"):
            i += 2 if token == "--check-hash-based-pycs" else 1
            continue
        for j, letter in enumerate(token[1:], start=1):
            if letter in "cm":   # the program (with the flags before it: `-um memprof.cli`)
                return argv[:i] + ([token[:j]] if j > 1 else [])
            if letter in "WX":   # takes a value: the rest of the token, else the next one
                i += j == len(token) - 1
                break
        i += 1
    return argv[:i]


class TargetFailed(Exception):
    """Finding the module ran code of the user's that raised (a parent package's __init__):
    the script failed, as under python (its traceback, status 1), not memprof's usage."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def resolve(script: str | None, module: str | None, args: list[str] = ()) -> RunTarget:
    if module is not None:
        return _module(module, list(args))
    if script is None:
        raise UsageError("run: expected a script (memprof run train.py ...) or -m MODULE")
    if os.path.isdir(script):
        main = os.path.join(_absolute(script), "__main__.py")
        if not os.path.isfile(main):
            raise UsageError(f"script {script!r}: a directory without a __main__.py")
        spec = importlib.util.spec_from_file_location("__main__", main)   # as runpy makes it
        return RunTarget(script, main, _read(main), script, _absolute(script), spec)
    if not os.path.isfile(script):
        raise UsageError(f"script {script!r}: no such file")
    if zipfile.is_zipfile(script):   # a zipapp, as python runs it: its __main__.py
        return _zipapp(script)
    # the script's imports are found beside the file a symlink points to, as under python
    return RunTarget(script, _absolute(script), _read(script), script,
                     os.path.dirname(os.path.realpath(script)))


def _zipapp(script: str) -> RunTarget:
    """`python app.zip`: the archive first on sys.path, its __main__.py run from it."""
    archive = _absolute(script)
    spec = zipimport.zipimporter(archive).find_spec("__main__")
    if spec is None:
        raise UsageError(f"script {script!r}: a zip file without a __main__.py")
    if not spec.origin.endswith(".py"):
        raise UsageError(f"script {script!r}: a zipapp whose __main__ is compiled only "
                         f"({os.path.basename(spec.origin)}): memprof runs its source")
    # the bytes as stored: compile() reads a `# -*- coding: ... -*-` line, as python does
    source = spec.loader.get_data(spec.origin)
    return RunTarget(script, spec.origin, source, script, archive, spec)


def _absolute(path: str) -> str:
    """The path as Python 3.9+ names the __main__ file and a directory's sys.path[0]: made
    absolute, not normalised (`./x/../train.py` stays so in tracebacks and __file__)."""
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def _module(name: str, args: list[str]) -> RunTarget:
    """`-m NAME`: the current directory first on sys.path (as python -m puts it), the module
    found (its parent packages imported, as Python does, with sys.argv ['-m', args...])
    and a package run by its __main__."""
    cwd, argv = os.getcwd(), sys.argv
    sys.path.insert(0, cwd)
    sys.argv = ["-m"] + args
    try:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations is not None:
            spec = importlib.util.find_spec(f"{name}.__main__")
            if spec is None:
                raise UsageError(f"-m {name!r}: a package without a __main__ module")
    except ModuleNotFoundError as err:
        if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
            raise TargetFailed(err) from None   # a package's __init__ imports what is missing
        raise UsageError(f"-m {name!r}: {type(err).__name__}: {err}") from None
    except ValueError as err:
        raise UsageError(f"-m {name!r}: {type(err).__name__}: {err}") from None
    except Exception as err:  # noqa: BLE001  (the user's package raised while imported)
        raise TargetFailed(err) from None
    finally:
        sys.path.remove(cwd)
        sys.argv = argv
    if spec is None or spec.origin is None or not os.path.isfile(spec.origin):
        raise UsageError(f"-m {name!r}: no module of that name (a .py file or package on "
                         "sys.path, the current directory first)")
    get_source = getattr(spec.loader, "get_source", None)
    source = get_source(spec.name) if get_source is not None else None
    if source is None:
        raise UsageError(f"-m {name!r}: {spec.origin} has no Python source to run")
    return RunTarget(name, spec.origin, source.encode(), spec.origin, cwd, spec)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def split_argv(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """`run [memprof options] (SCRIPT | -m MODULE) [args...]` -> (what argparse reads, the
    script's arguments exactly as given). argparse would read a script's own `-o` or `--json`
    after `-m MODULE`, and drops a `--` the script should see (`python s.py -- x` gives the
    script `['s.py', '--', 'x']`)."""
    takes_value = {s for a in parser._actions if a.option_strings and a.nargs != 0
                   for s in a.option_strings}
    longs = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]

    def needs_value(token: str) -> bool:   # argparse takes unambiguous prefixes (--out)
        if token in takes_value or not token.startswith("--") or "=" in token:
            return token in takes_value
        matches = [s for s in longs if s.startswith(token)]
        return len(matches) == 1 and matches[0] in takes_value

    i = 1
    while i < len(argv):
        token = argv[i]
        if token == "-m":
            return argv[:i + 2], argv[i + 2:]
        if token.startswith("-m") and not token.startswith("--"):
            return argv[:i + 1], argv[i + 1:]      # -mNAME
        if token == "--":
            return argv[:i + 2], argv[i + 2:]
        if not token.startswith("-") or token == "-":
            return argv[:i + 1], argv[i + 1:]
        i += 2 if needs_value(token) else 1
    return argv, []
