"""`memprof` command line: subcommands in the style of memray (run, report, demo, ...)."""
from __future__ import annotations

import argparse
import json
import os
import sys


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


def _cmd_run(args) -> int:
    import memprof
    if not os.path.isfile(args.script):
        raise UsageError(f"script {args.script!r}: no such file")
    output = args.output or os.path.splitext(os.path.basename(args.script))[0] + ".memprof"
    sys.argv = [args.script] + list(args.script_args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    status = 0
    with open(args.script, "rb") as f:
        code = compile(f.read(), args.script, "exec")
    # The script's namespace is ours, so the leak checks can name its variables as holders
    # even when the script raises.
    namespace = {"__name__": "__main__", "__file__": os.path.abspath(args.script),
                 "__builtins__": __builtins__}
    tracker = memprof.track(auto_modules=True, path=output)
    tracker.roots.append(("", namespace))
    try:
        with tracker:
            exec(code, namespace)  # noqa: S102  (running the user's script is the point)
    except SystemExit as exc:  # the script's own exit: keep its status, still report
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # noqa: BLE001  (profile is saved by track(); report, then fail)
        print(f"memprof: {args.script} raised {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    if tracker.profile is not None:
        if args.json:
            print(json.dumps(tracker.profile.summary(), indent=1, default=str))
        else:
            tracker.profile.report()
            print(f"profile saved to {output}")
    return status


def _cmd_report(args) -> int:
    import memprof
    prof = memprof.load(args.profile)
    if args.json:
        print(json.dumps(prof.summary(), indent=1, default=str))
    else:
        prof.report(top=args.top)
    for out in args.export or []:
        print(f"exported {prof.export(out)}")
    if args.fail_on_findings and memprof.findings(prof):
        return 3
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(quick=args.quick)


def _cmd_gpus(args) -> int:
    from . import gpus
    if args.json:
        print(json.dumps(gpus.table(), indent=1))
    else:
        print(gpus.format_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memprof", description=(
        "Memory and throughput profiler for PyTorch training: where memory goes, what fits, "
        "and how to make it smaller."))
    sub = p.add_subparsers(dest="command", metavar="command")
    sub.required = True

    r = sub.add_parser("run", help="profile an unmodified training script")
    r.add_argument("script")
    r.add_argument("script_args", nargs=argparse.REMAINDER)
    r.add_argument("-o", "--output", help="profile file (default: <script>.memprof)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.set_defaults(func=_cmd_run)

    rep = sub.add_parser("report", help="print the report of a saved profile")
    rep.add_argument("profile")
    rep.add_argument("--json", action="store_true", help="print the summary as JSON")
    rep.add_argument("--top", type=int, default=8, help="rows per table (default 8)")
    rep.add_argument("--export", action="append", metavar="FILE",
                     help="also export (.json Chrome trace, .html report, .pickle snapshot)")
    rep.add_argument("--fail-on-findings", action="store_true",
                     help="exit with status 3 when there are warnings or errors (for CI)")
    rep.set_defaults(func=_cmd_report)

    d = sub.add_parser("demo", help="the story of seeds/000 end to end, on a built-in model")
    d.add_argument("--quick", action="store_true", help="fewer steps (for tests)")
    d.set_defaults(func=_cmd_demo)

    g = sub.add_parser("gpus", help="the GPU table used by `recommend`")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=_cmd_gpus)

    from .recommend import add_cli as add_recommend
    add_recommend(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"memprof: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # bad input (unknown GPU, unreadable profile, ...): one line, no traceback
        print(f"memprof {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
