"""`memprof` command line: one Command object per subcommand (memprof.cli.base.Command)."""
from __future__ import annotations

import argparse
import sys

from .base import Command, UsageError


def commands() -> list[Command]:
    from .demo import COMMAND as demo
    from .gpus import COMMAND as gpus
    from .recommend import COMMAND as recommend
    from .report import COMMAND as report
    from .run import COMMAND as run
    return [run, report, recommend, gpus, demo]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memprof", description=(
        "Memory and throughput profiler for PyTorch training: where memory goes, what fits, "
        "and how to make it smaller."))
    sub = p.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for cmd in commands():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        cmd.add_arguments(sp)
        sp.set_defaults(command_object=cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.command_object.run(args) or 0)
    except UsageError as exc:
        print(f"memprof: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # bad input (unknown GPU, unreadable profile, ...): one line, no traceback
        print(f"memprof {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
