"""`memprof run script.py [args...]`: profile an unmodified training script."""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import decimal
import os
import re
import signal
import sys
import threading
import traceback

from ..record.patches import PatchRegistry
from ..report import PROFILE_EXPORTS
from ..record.events import EVENT_DTYPE
from ..record.session import DEFAULT_CAPACITY, MAX_CAPACITY
from ..record.update_watch import is_call_site
from ..track_autosave import DEFAULT_AUTOSAVE_S
from .base import (Command, UsageError, at_least_one, check_writable, seconds_or_off,
                   stdout_to_devnull)
from .report import BUDGET_FORMS, parse_budget
from .run_report import print_report
from .run_target import RunTarget, TargetFailed, resolve, split_argv
from .signals import EXIT_STATUS, ExitSignals, Terminated
from .spawned import SpawnWatch
from .step_on import HELP as STEP_ON_HELP, KEYWORDS as STEP_ON_KEYWORDS, \
    install as install_step_on, track_mode


#: memprof's own files, left out of a traceback of the user's code
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RunCommand(Command):
    name = "run"
    help = "profile an unmodified training script"
    description = ("Run a Python script under memprof.track(auto_modules=True), then print the "
                   "report and save the profile. Options for memprof come before the script; "
                   "everything after the script's name is passed to the script. "
                   "Distributed: `memprof run --nproc-per-node N script.py` starts N ranks on "
                   "this machine with torch.distributed's launcher (torchrun --standalone); on "
                   "several nodes run `torchrun [its options] -m memprof.cli run script.py` on "
                   "each. Each rank records itself and saves <output>.rank<R>.memprof (rank, "
                   "world size and backend in its meta, collectives timed, DDP/FSDP "
                   "communication buffers categorised); rank 0 prints its report, `memprof "
                   "report <name>.rank*.memprof` merges them.")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("script", nargs="?",
                            help="the script (or a directory with a __main__.py), as for python")
        parser.add_argument("-m", dest="module", metavar="MODULE",
                            help="run a module as `python -m MODULE` does; its arguments "
                                 "follow it")
        # optional (a script without arguments); argparse < 3.12 would list it as required
        parser.add_argument("script_args", nargs=argparse.REMAINDER).required = False
        parser.add_argument("-o", "--output", help="profile file (default: <script>.memprof)")
        parser.add_argument("--json", action="store_true",
                            help="print the summary as JSON: stdout holds that document alone "
                                 "(the script's own output goes to stderr)")
        parser.add_argument("--nproc-per-node", type=int, metavar="N",
                            help="run the script as N ranks of a torch.distributed job on this "
                                 "machine (torchrun --standalone --nproc-per-node N); each "
                                 "rank saves <output>.rank<R>.memprof")
        self._parser = parser   # its options are passed on to each rank
        parser.add_argument("--step-on", metavar="WHAT", help=STEP_ON_HELP)
        parser.add_argument("--batch-size", type=at_least_one, metavar="N",
                            help="samples per micro-step, for samples/s where memprof cannot "
                                 "read it off the model's inputs (memprof.track(batch_size=N)); "
                                 "given, it is used over what the inputs say")
        parser.add_argument("--health", action="store_true",
                            help="also record training health (loss, grad norm before and "
                                 "after clipping, LR per step: memprof.track(health=True)) "
                                 "and find its problems: a scheduler stepped per micro-batch, "
                                 "warmup in micro-steps, non-finite losses, loss spikes")
        parser.add_argument("--budget", metavar="GPU",
                            help=f"also replay the run against a GPU's usable memory "
                                 f"({BUDGET_FORMS}): where it would run out")
        parser.add_argument("--capacity", type=event_count, metavar="EVENTS",
                            default=DEFAULT_CAPACITY,
                            help=f"allocations and frees the event log keeps (default "
                                 f"{DEFAULT_CAPACITY:,}: {EVENT_DTYPE.itemsize} bytes each, "
                                 f"{DEFAULT_CAPACITY * EVENT_DTYPE.itemsize / 1e9:.2g} GB of "
                                 f"host memory at most); past it they are dropped and the "
                                 f"report covers the steps before. 50M, 2.5G: decimal "
                                 f"suffixes")
        parser.add_argument("--autosave", type=seconds_or_off, metavar="SECONDS",
                            default=DEFAULT_AUTOSAVE_S,
                            help=f"save the profile so far at a step end every SECONDS at "
                                 f"most (default {DEFAULT_AUTOSAVE_S:g}; 0: only at the end), so "
                                 f"a run killed outright (the OOM killer's SIGKILL, exit status "
                                 f"137) still leaves one, marked partial")

    def split_argv(self, argv: list[str]) -> tuple[list[str], list[str] | None]:
        return split_argv(argv, self._parser)

    def run(self, args) -> int:
        if args.module is not None and args.script is not None:   # `run -m M x`: x is M's
            args.script_args = [args.script] + list(args.script_args)
            args.script = None
        try:
            target = resolve(args.script, args.module, args.script_args)
        except TargetFailed as failed:   # a package's __init__ raised: as python -m says it
            _print_user_traceback(failed.error)
            return 1
        if args.step_on == "auto":   # track(step_on=)'s name for the default
            args.step_on = None
        if args.nproc_per_node is not None:
            return self._launch(args, target)
        args.budget = parse_budget(args.budget)   # an unknown GPU fails before the script
        args.launch_dir = os.getcwd()   # paths are shown from here if the script changes it
        output = _output(args, target)
        # sys.argv, sys.path and __main__ as the script expects them; where the process ends
        # after the run (the `memprof` command) they stay so to its end, as under python:
        # the script's atexit handlers and threads still pickle its classes and read its argv
        world = PatchRegistry()
        world.set(sys, "argv", [target.argv0] + list(args.script_args))
        if hasattr(sys, "orig_argv"):   # python's command line for the script, not memprof's
            world.set(sys, "orig_argv", target.orig_argv(args.script_args))
        # the launcher's own first entry (the console script's bin directory, the current
        # directory of `python -m memprof.cli`) is the script's directory instead, as python
        # would give it: kept, the bin directory was one more place imports were looked for
        # (PYTHONSAFEPATH, -P: python puts no script directory first, nor does memprof)
        if not getattr(sys.flags, "safe_path", False):
            world.set(sys, "path", [target.path0] + sys.path[1:])
        saved_main = sys.modules.get("__main__")
        patches = PatchRegistry()   # memprof's own (--step-on, spawned processes)
        try:
            # SIGTERM saves; Ctrl-C while saving cannot lose it; the script's handlers are
            # back for its atexit handlers where the process ends after the run
            with ExitSignals(getattr(args, "process_ends", False)) as signals:
                args.stopped_by = None
                status = self._run_script(args, target, output, signals, patches)
                status, args.exit_signal = signals.status(status, args.stopped_by)
                return status
        finally:
            patches.restore()
            if not getattr(args, "process_ends", False):   # main() in-process: the caller's
                world.restore()
                sys.modules["__main__"] = saved_main

    def _run_script(self, args, target: RunTarget, output: str, signals: ExitSignals,
                    patches: PatchRegistry) -> int:
        import memprof
        status = 0
        script, source = target.filename, target.source
        try:
            # dont_inherit: the script's own __future__ imports only (this module's
            # `annotations` made every annotation of the script a string)
            code = compile(source, script, "exec", dont_inherit=True)
        except SyntaxError as exc:   # Python's own message; nothing ran, nothing to profile
            traceback.print_exception(exc.__class__, exc, None, file=sys.stderr)
            return 1
        main = target.main_module()
        tracker = memprof.track(auto_modules=True, path=output, budget=args.budget,
                                step_on=track_mode(args.step_on), batch_size=args.batch_size,
                                autosave=args.autosave or None, capacity=args.capacity,
                                health=args.health)
        tracker.session.capacity_knob = "memprof run --capacity"
        tracker.session.nests_any_thread = True   # the script's blocks nest from any thread
        tracker.keep_a_profile_over_nothing = True   # (`train.py --help` after a long run)
        code = install_step_on(args.step_on, code, source, script, tracker.step,
                               patches)   # restored with sys.argv and sys.path
        tracker.report_oom_on_exit = args.json   # else the report below has the diagnosis
        # processes the script starts with torch.multiprocessing record themselves (a function
        # named by --step-on ends their steps too: step_on.install_in_process)
        spawned = SpawnWatch(output, dict(
            budget=args.budget, batch_size=args.batch_size, autosave=args.autosave or None,
            capacity=args.capacity, health=args.health,
            step_on=args.step_on if args.step_on in STEP_ON_KEYWORDS else "auto"), args.json,
            args.launch_dir, step_on=args.step_on, script=script)
        spawned.install(patches)
        # the script's globals are searched for holders of leaked tensors, even if it raises
        tracker.roots.append(("", main.__dict__))
        sys.modules["__main__"] = main   # pickle and multiprocessing (spawn) find the script
        before = set(threading.enumerate())
        streams = (sys.stdout, sys.stderr)   # memprof's output goes there, not the script's
        shown: list = []   # the script's end, shown as python shows it before it waits
        try:
            with tracker, _script_output_on_stderr(args.json):
                try:
                    exec(code, main.__dict__)  # noqa: S102  (running the script is the point)
                except (KeyboardInterrupt, Terminated):
                    target.code_ended(main)
                    raise
                except BaseException as exc:  # noqa: BLE001  (shown, waited, then as below)
                    status = _exit_status(exc) if isinstance(exc, SystemExit) else \
                        _report_uncaught(exc) or 1
                    shown.append(exc)
                    if not isinstance(exc, SystemExit):
                        target.code_ended(main)
                    wait_for_script_threads(before)
                    raise
                else:
                    target.code_ended(main)
                    wait_for_script_threads(before)
                finally:
                    signals.finish()
        except SystemExit as exc:  # the script's own exit: its status and message, as Python
            if exc not in shown:
                status = _exit_status(exc)
        except (KeyboardInterrupt, Terminated) as exc:
            if isinstance(exc, KeyboardInterrupt):   # Python prints where it stopped
                _print_user_traceback(exc)
            how = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else \
                signal.Signals(exc.signum).name
            print(f"memprof: {target.name} stopped by {how}", file=sys.stderr)
            # Python dies by the signal (after its finalization): so does memprof, once saved
            args.stopped_by = signal.SIGINT if isinstance(exc, KeyboardInterrupt) \
                else exc.signum
            status = EXIT_STATUS[args.stopped_by]
        except BaseException as exc:  # noqa: BLE001  (profile saved by track(); report, fail)
            if exc not in shown:
                _report_uncaught(exc)
            status = 1
        if tracker.forked_away:   # a child the script forked ran on to its end: as Python
            return status
        # where the script's work all ran in those processes, theirs are the reports
        idle = bool(spawned.started) and tracker.profile is not None and \
            not tracker.profile.modules
        with _streams_of_the_run(streams):
            try:
                status = print_report(tracker, output, status, as_json=args.json, brief=idle,
                                      base=args.launch_dir)
                note = spawned.note()
                if note:
                    print(note, file=sys.stderr if args.json else sys.stdout)
            except BrokenPipeError:   # `memprof run s.py | head`: the reader had what it
                # wanted, as Python's output was; the profile is saved, the status stands
                stdout_to_devnull()
        if args.json and getattr(args, "process_ends", False):
            # the document is stdout's last: what the script prints from here on (its atexit
            # handlers, its threads) goes to stderr too (`| jq` failed with "Extra data")
            _flush_stdout()
            os.dup2(2, 1)
        return status

    def _launch(self, args, target: RunTarget) -> int:
        """`--nproc-per-node N`: torch.distributed's elastic launcher starts N processes,
        each `python -m memprof.cli run [these options] script args` as one rank."""
        if args.nproc_per_node < 1:
            raise UsageError(f"--nproc-per-node {args.nproc_per_node}: expected a positive "
                             "number of processes")
        parse_budget(args.budget)   # bad input fails here, once, not in every rank
        output = _output(args, target)
        from torch.distributed import run as torchrun
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        launcher = torchrun.get_args_parser().parse_args(
            ["--standalone", "--nproc-per-node", str(args.nproc_per_node), "--module",
             "memprof.cli", "run", "-o", output] + self._memprof_options(args)
            + (["-m", target.name] if target.is_module else [target.name])
            + list(args.script_args))
        try:
            torchrun.run(launcher)
        except ChildFailedError as err:   # the launcher stops the other ranks: name the first
            rank, first = err.get_first_failure()
            how = f"exit {first.exitcode}"
            if first.exitcode == -signal.SIGKILL:   # nothing ran after it, no exit path saved
                how += (", SIGKILL: the kernel's OOM killer or kill -9; its profile is the last "
                        "one saved while it ran, if any (--autosave)")
            print(f"memprof run: rank {rank} failed first ({how})"
                  + _other_ranks(err.failures, rank), file=sys.stderr)
            return 1
        return 0

    def _memprof_options(self, args) -> list[str]:
        """The memprof options given on this command line, as each rank's command line
        (the launcher's own and --output, passed separately, left out)."""
        out: list[str] = []
        for action in self._parser._actions:
            if not action.option_strings or action.dest in ("help", "nproc_per_node",
                                                              "output", "module"):
                continue
            value = getattr(args, action.dest, None)
            if value is None or value is False or value == action.default:
                continue
            flag = action.option_strings[-1]
            values = value if isinstance(value, list) else [value]
            out += [flag] if value is True else [x for v in values for x in (flag, str(v))]
        return out


def event_count(text: str) -> int:
    """An argparse type: a number of events, whole, 1 to MAX_CAPACITY, as written or with a
    decimal suffix (50M, 2.5G, 500k, 1e6), as --capacity takes it."""
    given = text.strip()
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(given[-1:].lower(), 1)
    number = given[:-1] if scale > 1 else given
    n = None
    if re.fullmatch(r"\d+(_\d+)*(\.\d+)?(e[+-]?\d+)?", number, re.IGNORECASE):
        try:
            n = decimal.Decimal(number) * scale
        except decimal.DecimalException:   # (an exponent past Decimal's own range)
            n = None
    if n is None or n != n.to_integral_value():
        raise argparse.ArgumentTypeError(f"expected a whole number of events such as 50000000 "
                                         f"or 50M, got {text!r}")
    if not 1 <= n <= MAX_CAPACITY:
        raise argparse.ArgumentTypeError(f"expected a number of events from 1 to "
                                         f"{MAX_CAPACITY:,}, got {text!r}")
    return int(n)


@contextlib.contextmanager
def _script_output_on_stderr(enabled: bool):
    """With --json, stdout holds memprof's one document: what the script prints to stdout -
    and the processes it starts, which inherit the descriptor - goes to stderr meanwhile (a
    Trainer's log lines before the document made `memprof run --json train.py | jq` fail)."""
    if not enabled:
        yield
        return
    _flush_stdout()
    saved = os.dup(1)
    os.dup2(2, 1)
    # line by line meanwhile, as stderr is: a pipe's block buffering held the script's lines
    # back, to land after its child processes' lines and its own traceback
    stdout = sys.stdout
    line_buffered = getattr(stdout, "line_buffering", None)
    _reconfigure(stdout, True)
    try:
        yield
    finally:
        _flush_stdout()   # what the script printed and Python or C still buffer
        _reconfigure(stdout, line_buffered)
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def _streams_of_the_run(streams: tuple):
    """sys.stdout and sys.stderr as they were when the run started, for memprof's report: a
    script that replaced them (a tee into its log file, `sys.stdout = open("log.txt", "w")`)
    had the report, and --json's document, written into its log. The script's are flushed
    first (their lines before the report) and put back after (its atexit handlers' output
    goes where it said). One the script closed (`sys.stdout.close()` at its end: the report
    failed, 'I/O operation on closed file', exit status 2) is opened again on its descriptor,
    which python leaves open."""
    script = (sys.stdout, sys.stderr)
    for stream in script:
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):   # closed, or no flush
            pass
    opened: list = []
    own = tuple(_open_stream(s, now, fd, opened) for s, now, fd in zip(streams, script, (1, 2)))
    sys.stdout, sys.stderr = own
    try:
        yield
    finally:
        if sys.stdout is own[0] and sys.stderr is own[1]:
            sys.stdout, sys.stderr = script
        for stream in opened:
            try:
                stream.close()   # (flushed; the descriptor stays open)
            except (OSError, ValueError):
                pass


def _open_stream(stream, script_stream, fd: int, opened: list):
    """`stream` where it is open, else the script's, else a new one on `fd` (or os.devnull
    where the descriptor is closed too)."""
    for candidate in (stream, script_stream):
        if candidate is not None and not getattr(candidate, "closed", False):
            return candidate
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        os.fstat(fd)
        new = open(fd, "w", encoding=encoding, errors="backslashreplace", closefd=False)
    except (OSError, ValueError):
        new = open(os.devnull, "w", encoding=encoding)
    opened.append(new)
    return new


def _reconfigure(stream, line_buffering) -> None:
    if line_buffering is not None and hasattr(stream, "reconfigure"):
        try:
            stream.reconfigure(line_buffering=line_buffering)
        except (OSError, ValueError):   # closed by the script
            pass


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError, AttributeError):   # closed or replaced by the script
        pass
    try:   # what native code wrote through C's stdio (flushed at exit, after the document)
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def _other_ranks(failures: dict, first) -> str:
    """What became of the ranks other than the first to fail, for the launcher's line: those
    torchrun stopped with SIGTERM once one failed are not failures of their own (a rank that
    had printed its report and saved was counted as "did not finish")."""
    others = [f for r, f in failures.items() if r != first]
    stopped = sum(f.exitcode == -signal.SIGTERM for f in others)
    failed = len(others) - stopped
    parts = ([f"{failed} other rank{'s' if failed > 1 else ''} failed too"] if failed else []) \
        + ([f"{stopped} other rank{'s were' if stopped > 1 else ' was'} stopped by SIGTERM (the "
            "launcher stops the others once one fails)"] if stopped else [])
    return "; " + ", ".join(parts) if parts else ""


def wait_for_script_threads(before: set) -> None:
    """What python does once the main code has ended, before it exits: wait for the threads
    the script started that are not daemons (a training thread it did not join: the block
    ended without its steps). The threads of an executor left open (ThreadPoolExecutor's
    workers, ProcessPoolExecutor's manager) are not waited for here: python ends them through
    threading's exit hooks, after this block (waiting for a process pool's manager hung)."""
    me = threading.current_thread()
    while True:
        waiting = [t for t in threading.enumerate()
                   if t not in before and t is not me and not t.daemon and t.is_alive()
                   and not _ended_by_exit_hooks(t)]
        if not waiting:
            return
        for t in waiting:
            t.join()


def _ended_by_exit_hooks(thread: threading.Thread) -> bool:
    """Whether `thread` is an executor's, which python ends at exit (concurrent.futures
    registers with threading's exit hooks) rather than waits for."""
    pool_worker = getattr(sys.modules.get("concurrent.futures.thread"), "_worker", None)
    manager = getattr(sys.modules.get("concurrent.futures.process"), "_ExecutorManagerThread",
                      None)
    return (pool_worker is not None and getattr(thread, "_target", None) is pool_worker) or \
        (manager is not None and isinstance(thread, manager))


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


def _from_the_scripts_frames(tb):
    """`tb` from its first frame that is not memprof's own (nor importlib's frozen ones);
    all of it where every frame is. The frames that repeat a caller's line for the update
    watch (record.update_watch.is_call_site) are unlinked: python has no such frame."""
    first = tb
    while first is not None and (first.tb_frame.f_code.co_filename.startswith(_OWN_DIR)
                                 or first.tb_frame.f_code.co_filename.startswith("<")):
        first = first.tb_next
    here = first
    while here is not None and here.tb_next is not None:
        if is_call_site(here.tb_next.tb_frame.f_code):
            here.tb_next = here.tb_next.tb_next
        else:
            here = here.tb_next
    return first or tb


def _report_uncaught(exc: BaseException) -> None:
    """What Python does with an exception the script did not catch: the script's own
    sys.excepthook where it set one (rich.traceback.install(), loguru, a crash reporter),
    given the traceback from the script's first frame; else the traceback printed."""
    hook = sys.excepthook
    if hook is sys.__excepthook__:
        _print_user_traceback(exc)
        return
    try:
        hook(type(exc), exc, _from_the_scripts_frames(exc.__traceback__))
    except BaseException as failed:  # noqa: BLE001  (as Python: both are printed)
        print("Error in sys.excepthook:", file=sys.stderr)
        traceback.print_exception(type(failed), failed, failed.__traceback__, file=sys.stderr)
        print("\nOriginal exception was:", file=sys.stderr)
        _print_user_traceback(exc)


def _print_user_traceback(exc: BaseException) -> None:
    """The traceback Python would print for the user's code: the frames above its first one
    (memprof's own, importlib's frozen ones) are left out, and the frame of memprof's signal
    handler that raised a Ctrl-C's KeyboardInterrupt (Python's own handler raises it in the
    interrupted frame, the last one printed); so are memprof's wrappers between the user's
    frames, unless the error was raised in memprof's own code (then it is all shown)."""
    innermost = exc.__traceback__
    while innermost is not None and innermost.tb_next is not None:
        innermost = innermost.tb_next
    in_a_call_site = innermost is not None and is_call_site(innermost.tb_frame.f_code)
    report = traceback.TracebackException(type(exc), exc,
                                          _from_the_scripts_frames(exc.__traceback__))
    last = report.stack[-1] if report.stack else None
    handler = ExitSignals._handle.__code__
    if last is not None and len(report.stack) > 1 and last.name == handler.co_name and \
            last.filename == handler.co_filename:
        report.stack.pop()
        last = report.stack[-1]
    if last is not None and (in_a_call_site or not last.filename.startswith(_OWN_DIR)):
        # raised in the script's code (or torch's), not in memprof's: memprof's wrappers
        # between its frames (backward's, an optimizer hook's) are not in Python's traceback
        report.stack = traceback.StackSummary.from_list(
            [f for f in report.stack if not f.filename.startswith(_OWN_DIR)])
    print("".join(report.format()), end="", file=sys.stderr)


def _output(args, target: RunTarget) -> str:
    """--output, or <script>.memprof, as an absolute path (a script that changes its working
    directory, as hydra's runs do, left it in the new one); checked now, not after an hour of
    training."""
    output = args.output or target.stem + ".memprof"
    stem, ext = os.path.splitext(output)
    if ext.lower() in PROFILE_EXPORTS:   # (a zip file a browser or JSON reader shows as bytes)
        raise UsageError(f"--output {output!r}: a profile is a .memprof file (a {ext} file is "
                         f"one of its exports): run with -o {stem}.memprof, then memprof "
                         f"report {stem}.memprof --export {output}")
    check_writable(output, "--output")
    if os.path.exists(output):
        from ..profile_file import may_replace
        if os.path.samefile(output, target.filename) or not may_replace(output):
            raise UsageError(f"--output {output!r}: exists and is not a memprof profile (it "
                             "would be replaced); remove it or give another file name")
    return os.path.abspath(output)


COMMAND = RunCommand()
