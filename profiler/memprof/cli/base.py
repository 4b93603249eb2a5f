"""What every subcommand is: a name, its arguments, and run(args) -> exit status."""
from __future__ import annotations

import argparse
import os
import sys


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


class Command:
    """One subcommand. Subclasses set name/help/description and implement both methods;
    errors for bad input are raised as UsageError (or ValueError/TypeError) with one line
    naming the input and what was expected."""
    name: str = ""
    help: str = ""
    description: str = ""
    own_code_only: bool = False   # runs memprof's own code only, whatever its arguments

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError

    def split_argv(self, argv: list[str]) -> tuple[list[str], list[str] | None]:
        """(the command line argparse reads, arguments passed on verbatim or None): a command
        that runs a user's script keeps the script's arguments out of argparse's hands."""
        return argv, None

    def leaves_fast(self, args: argparse.Namespace) -> bool:
        """Whether the process may end without Python's finalization once run() returned
        (memprof.cli.console_main): a command says so only where memprof's own code alone
        ran, so no user object waits to be finalized (a file of theirs to flush, a __del__)."""
        return self.own_code_only


def seconds_or_off(text: str) -> float:
    """An argparse type: seconds (> 0), or 0 for none (--autosave); kept as 0, so that it
    reaches the ranks a launcher starts (options at their default are not passed on)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds (0: off), got {text!r}") \
            from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0 (0: off), got {text}")
    return v


def _whole_number_at_least(low: int, text: str) -> int:
    """A whole number, `low` or more, or argparse's error (printed with the option's name)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") \
            from None
    if n < low:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {n}")
    return n


def at_least_one(text: str) -> int:
    """An argparse type: a whole number, 1 or more (--top, --batch-size)."""
    return _whole_number_at_least(1, text)


def at_least_zero(text: str) -> int:
    """An argparse type: a whole number, 0 or more (--warmup-steps)."""
    return _whole_number_at_least(0, text)


def positive_number(text: str) -> float:
    """An argparse type: a finite number > 0 (a learning rate)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return x


def stdout_to_devnull() -> None:
    """After a reader closed stdout (`| head`): the rest of the output, and the flush at
    exit, go nowhere instead of failing again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def check_writable(path: str, option: str, extensions: tuple[str, ...] = ()) -> None:
    """Fail before the work (a script's run, a report, a plan), not after it, when `path`
    could not be written: a format not in `extensions`, a directory, a missing directory, or
    one where no file can be made (read-only, /proc: tried, as access() passes for root)."""
    if extensions and not path.lower().endswith(extensions):
        names = ", ".join(extensions[:-1]) + f" or {extensions[-1]}" if len(extensions) > 1 \
            else extensions[0]
        raise UsageError(f"{option} {path!r}: unknown export format; expected a {names} file "
                         "name")
    from ..profile_file import unwritable   # (numpy and torch: not for every command's start)
    problem = unwritable(path)
    if problem is not None:
        raise UsageError(f"{option} {path!r}: {problem}")


def check_export(path: str, option: str, extensions: tuple[str, ...]) -> None:
    """check_writable for an export (a report, a trace, a plan), which never replaces a
    profile: one saved under an export's name was replaced by its own trace."""
    check_writable(path, option, extensions)
    from ..report import export_problem
    problem = export_problem(path)
    if problem is not None:
        raise UsageError(f"{option} {path!r}: {problem}")
