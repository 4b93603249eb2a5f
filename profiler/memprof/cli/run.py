"""`memprof run script.py [args...]`: profile an unmodified training script."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..record.patches import PatchRegistry
from .base import Command, UsageError


class RunCommand(Command):
    name = "run"
    help = "profile an unmodified training script"
    description = ("Run a Python script under memprof.track(auto_modules=True), then print the "
                   "report and save the profile. Options for memprof come before the script; "
                   "everything after the script's name is passed to the script.")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("script")
        parser.add_argument("script_args", nargs=argparse.REMAINDER)
        parser.add_argument("-o", "--output", help="profile file (default: <script>.memprof)")
        parser.add_argument("--json", action="store_true", help="print the summary as JSON")

    def run(self, args) -> int:
        if not os.path.isfile(args.script):
            raise UsageError(f"script {args.script!r}: no such file")
        output = args.output or os.path.splitext(os.path.basename(args.script))[0] + ".memprof"
        patches = PatchRegistry()   # sys.argv and sys.path as the script expects them
        patches.set(sys, "argv", [args.script] + list(args.script_args))
        patches.set(sys, "path", [os.path.dirname(os.path.abspath(args.script))] + sys.path)
        try:
            return self._run_script(args, output)
        finally:
            patches.restore()

    def _run_script(self, args, output: str) -> int:
        import memprof
        from memprof.analyse import summary
        status = 0
        with open(args.script, "rb") as f:
            code = compile(f.read(), args.script, "exec")
        # The script's namespace is ours, so the leak checks can name its variables as
        # holders even when the script raises.
        namespace = {"__name__": "__main__", "__file__": os.path.abspath(args.script),
                     "__builtins__": __builtins__}
        tracker = memprof.track(auto_modules=True, path=output)
        tracker.roots.append(("", namespace))
        try:
            with tracker:
                exec(code, namespace)  # noqa: S102  (running the user's script is the point)
        except SystemExit as exc:  # the script's own exit: keep its status, still report
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # noqa: BLE001  (profile saved by track(); report, fail)
            print(f"memprof: {args.script} raised {type(exc).__name__}: {exc}", file=sys.stderr)
            status = 1
        if tracker.profile is not None:
            if args.json:
                print(json.dumps(summary(tracker), indent=1, default=str))
            else:
                memprof.show(tracker)
                print(f"profile saved to {output}")
        return status


COMMAND = RunCommand()
