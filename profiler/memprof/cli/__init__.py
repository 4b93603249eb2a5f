"""`memprof` command line: one Command object per subcommand (memprof.cli.base.Command)."""
from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading

from .base import Command, UsageError, stdout_to_devnull


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
    p.add_argument("--version", action="version", version=_version(),
                   help="memprof's version, with the torch and Python it runs on")
    sub = p.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for cmd in commands():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        cmd.add_arguments(sp)
        sp.set_defaults(command_object=cmd)
    return p


def _version() -> str:
    """From the installed distributions' metadata: a bug report's first line, without the
    seconds that importing torch takes."""
    from importlib import metadata

    def of(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"
    return (f"memprof {of('memprof')} (torch {of('torch')}, Python "
            f"{sys.version.split()[0]}, {sys.executable})")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (sys.argv's by default), a script's own arguments kept as given
    (Command.split_argv)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    passed_on = None
    for cmd in commands():
        if argv and argv[0] == cmd.name:
            argv, passed_on = cmd.split_argv(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:   # said with the command's own usage (the top-level one named no option)
        subparser = _subparsers(parser).get(args.command, parser)
        subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if passed_on is not None:
        args.script_args = passed_on
    return args


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: list[str] | None = None) -> int:
    return _run(parse(argv))


def console_main() -> None:
    """The `memprof` command (console script, `python -m memprof.cli`): main(), then, after a
    command that ran only memprof's own code (Command.leaves_fast), the process ends without
    Python's finalization, which frees torch, dynamo and sympy module by module (about 1 s of
    a 10 s `memprof recommend`, measured). atexit handlers still run (multiprocessing's among
    them) and the output is flushed. The process ends as Python's does after user code
    (`memprof run`, a model of the user's), while a non-daemon thread is alive, and under a
    tracer or profiler (`python -m cProfile -m memprof.cli ...` writes its stats after
    main returns)."""
    args = parse()
    args.process_ends = True   # `memprof run`: the script's sys.argv, sys.path, __main__ kept
    code = _run(args)
    exit_signal = getattr(args, "exit_signal", None)
    if exit_signal is not None:   # `memprof run`'s script stopped by a signal: as Python, the
        from memprof import _C    # process ends by it once finalized (see cli.signals)
        _C.exit_by_signal(int(exit_signal))
    if args.command_object.leaves_fast(args) and _nothing_else_to_end():
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):   # a closed pipe: nothing more can be said
                code = code or 1
        os._exit(code)
    sys.exit(code)


def _nothing_else_to_end() -> bool:
    """No non-daemon thread but this one (Python would wait for it) and no tracer or
    profiler (it has work of its own after main returns)."""
    if sys.gettrace() is not None or sys.getprofile() is not None:
        return False
    monitoring = getattr(sys, "monitoring", None)   # Python 3.12+: cProfile's hooks
    if monitoring is not None and any(monitoring.get_tool(i) is not None for i in range(6)):
        return False
    main = threading.main_thread()
    return all(t is main or t.daemon for t in threading.enumerate())


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.command_object.run(args) or 0)
    except UsageError as exc:
        print(f"memprof: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # bad input (unknown GPU, unreadable profile, ...): one line, no traceback
        print(f"memprof {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `memprof report run.memprof --json | head`: the reader stopped reading, and the
        # status says the output was cut (as the table's, whose flush fails at the exit);
        # a closed pipe of the user's code (a model factory's socket) is its own error
        if not _stdout_closed():
            raise
        stdout_to_devnull()
        return 1


def _stdout_closed() -> bool:
    """Whether stdout's reader is gone: a pipe whose other end closed polls as an error."""
    try:
        import select
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):   # no poll (not POSIX), no stdout
        return True


if __name__ == "__main__":
    console_main()
