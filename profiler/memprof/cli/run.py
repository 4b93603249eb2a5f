"""`memprof run script.py [args...]`: profile an unmodified training script."""
from __future__ import annotations

import argparse
import builtins
import json
import os
import sys
import traceback
import types

from ..record.patches import PatchRegistry
from .base import Command, UsageError
from .report import parse_budget
from .signals import ExitSignals, Terminated


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
        parser.add_argument("--budget", metavar="GPU",
                            help="also replay the run against a GPU's usable memory (a name "
                                 "from `memprof gpus`, or bytes): where it would run out")

    def run(self, args) -> int:
        if not os.path.isfile(args.script):
            raise UsageError(f"script {args.script!r}: no such file")
        args.budget = parse_budget(args.budget)   # an unknown GPU fails before the script
        output = args.output or os.path.splitext(os.path.basename(args.script))[0] + ".memprof"
        _check_output(output)
        patches = PatchRegistry()   # sys.argv and sys.path as the script expects them
        patches.set(sys, "argv", [args.script] + list(args.script_args))
        patches.set(sys, "path", [os.path.dirname(os.path.abspath(args.script))] + sys.path)
        try:
            with ExitSignals() as signals:   # SIGTERM saves; Ctrl-C while saving cannot lose it
                return signals.status(self._run_script(args, output, signals))
        finally:
            patches.restore()

    def _run_script(self, args, output: str, signals: ExitSignals) -> int:
        import memprof
        from memprof.analyse import summary
        status = 0
        with open(args.script, "rb") as f:
            source = f.read()
        try:
            code = compile(source, args.script, "exec")
        except SyntaxError as exc:   # Python's own message; nothing ran, nothing to profile
            traceback.print_exception(exc.__class__, exc, None, file=sys.stderr)
            return 1
        main = _main_module(args.script)
        tracker = memprof.track(auto_modules=True, path=output, budget=args.budget)
        tracker.report_oom_on_exit = args.json   # else the report below has the diagnosis
        # the script's globals are searched for holders of leaked tensors, even if it raises
        tracker.roots.append(("", main.__dict__))
        saved_main = sys.modules.get("__main__")
        sys.modules["__main__"] = main   # pickle and multiprocessing (spawn) find the script
        try:
            with tracker:
                try:
                    exec(code, main.__dict__)  # noqa: S102  (running the script is the point)
                finally:
                    signals.finish()
        except SystemExit as exc:  # the script's own exit: its status and message, as Python
            status = _exit_status(exc)
        except (KeyboardInterrupt, Terminated) as exc:
            how = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
            print(f"memprof: {args.script} stopped by {how}", file=sys.stderr)
            status = 130 if isinstance(exc, KeyboardInterrupt) else 143
        except BaseException as exc:  # noqa: BLE001  (profile saved by track(); report, fail)
            _print_script_traceback(exc, code.co_filename)
            status = 1
        finally:
            sys.modules["__main__"] = saved_main
        if tracker.profile is not None:
            if args.json:
                print(json.dumps(summary(tracker), indent=1, default=str))
            else:
                memprof.show(tracker)
        if tracker.saved == output:
            print(f"profile saved to {output}", file=sys.stderr if args.json else sys.stdout)
            return status
        if tracker.profile is None:   # else the tracker said why it could not save
            print(f"memprof: the profile was not saved to {output}", file=sys.stderr)
        return status or 1


def _main_module(script: str) -> types.ModuleType:
    """The script's own __main__ module, as `python script.py` (and runpy) would make it."""
    main = types.ModuleType("__main__")
    main.__file__ = os.path.abspath(script)
    main.__builtins__ = builtins
    main.__spec__ = None
    main.__loader__ = None
    return main


def _exit_status(exc: SystemExit) -> int:
    """sys.exit(code) as Python ends: an int is the status, None is 0, anything else is
    printed to stderr and the status is 1."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _print_script_traceback(exc: BaseException, script_file: str) -> None:
    """The traceback Python would print for the script: memprof's own frames above the
    script's first frame are left out."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != script_file:
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb or exc.__traceback__, file=sys.stderr)


def _check_output(output: str) -> None:
    """Fail before the script runs, not after an hour of training, when the profile could not
    be written where asked."""
    directory = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise UsageError(f"--output {output!r}: is a directory; give a file name")
    if not os.path.isdir(directory):
        raise UsageError(f"--output {output!r}: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"--output {output!r}: directory {directory!r} is not writable")


COMMAND = RunCommand()
