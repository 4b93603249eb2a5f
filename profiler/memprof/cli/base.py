"""What every subcommand is: a name, its arguments, and run(args) -> exit status."""
from __future__ import annotations

import argparse


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

    def leaves_fast(self, args: argparse.Namespace) -> bool:
        """Whether the process may end without Python's finalization once run() returned
        (memprof.cli.console_main): a command says so only where memprof's own code alone
        ran, so no user object waits to be finalized (a file of theirs to flush, a __del__)."""
        return self.own_code_only


def at_least_one(text: str) -> int:
    """An argparse type: a whole number, 1 or more (--top, --batch-size); argparse prints the
    message with the option's name."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") \
            from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {n}")
    return n
