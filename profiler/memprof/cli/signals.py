"""Signals while `memprof run` runs a script: whatever ends the script, the profile is saved.

* SIGINT (Ctrl-C) while the script runs: KeyboardInterrupt, as without memprof.
* SIGTERM (and SIGHUP: the terminal or SSH session that ran it closed) while the script runs:
  `Terminated` is raised in the script, so the tracker saves the profile on the way out (the
  default action would kill the process first).
* SIGINT, SIGTERM or SIGHUP once the script has ended (the profile is being built, analysed, saved and
  reported): noted, not raised, so a second Ctrl-C cannot lose the profile.

Where the process ends after the run (the `memprof` command, a spawned process), the handlers
the script had in place when its code ended are put back once the profile is saved, as python
leaves them installed through the script's atexit handlers (a SIGTERM during a slow checkpoint
save at exit reaches the script's handler, not the default action); `main()` called
in-process gets its caller's back.

Either way the process then ends as Python's would have: by the signal itself (its parent sees
it, not an exit status: a shell loop stops, subprocess returns -2), after the interpreter's
finalization (memprof.cli.console_main, `_C.exit_by_signal`); `main()` called in-process
returns 130 / 143 / 129 (128 + the signal's number) instead.

To the script, memprof's handler is the default action it stands in for: `signal.getsignal`
and the handler `signal.signal` returns read SIG_DFL / `default_int_handler` where it is in
place, and setting that default back puts it back (a script's SIGTERM handler that chained to
the previous one - a checkpoint, then `prev(signum, frame)` if callable - called memprof's and
the run ended by SIGTERM where python's ended with the script's status). Both are replaced
through memprof's patch registry (record.patches): one the script replaced meanwhile stays the
script's once memprof's handlers are gone, the other is python's again.

Only signals left at their default action are handled (a shell that ignores SIGINT for a
background job keeps doing so), and only on the main thread (Python's rule for handlers).

A process forked while they are handled (a DataLoader's or a Pool's worker, `os.fork()`) gets
the actions back that it would have had: inherited, the handler raised `Terminated` in a
worker that SIGTERM should end at once - a Pool's `terminate()` hung on a worker stopped inside
its queue's lock, and a SIGTERM to the job's process group (a closed terminal, `scancel`) had
every DataLoader worker die with a traceback. And once SIGTERM or SIGHUP stops the script,
torch's SIGCHLD handler is put back to the default: the workers dying of the same signal made
it raise "DataLoader worker is killed by signal" inside the save, and the profile was lost.
"""
from __future__ import annotations

import os
import signal
import threading

from ..record.patches import PatchRegistry

#: the signals handled, with what they do by default (SIGHUP: not on Windows)
_HANDLED = ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)) + \
    (((signal.SIGHUP, signal.SIG_DFL),) if hasattr(signal, "SIGHUP") else ())
EXIT_STATUS = {sig: 128 + int(sig) for sig, _ in _HANDLED}   # 130, 143, 129
_DEFAULTS = dict(_HANDLED)
_REAL_SIGNAL, _REAL_GETSIGNAL = signal.signal, signal.getsignal


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived while the script ran (a BaseException, like
    KeyboardInterrupt); `signum` is which."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


#: the ExitSignals whose handlers are in place (what a forked child undoes)
_ACTIVE: list = []
_FORK_HOOK = [False]


#: blocked in the forking thread around a fork: a SIGTERM that reached the child before it
#: put the default action back was caught by the inherited handler and then dropped (a Pool's
#: terminate() right after its workers started hung the run); blocked, it waits and then
#: ends the child as it would without memprof
_BLOCKED = tuple(sig for sig, default in _HANDLED if default is signal.SIG_DFL)
_MASKED: list = []


def _before_fork() -> None:
    if _ACTIVE and hasattr(signal, "pthread_sigmask"):
        _MASKED.append(signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED))


def _after_fork_in_parent() -> None:
    if _MASKED:
        signal.pthread_sigmask(signal.SIG_SETMASK, _MASKED.pop())


def _reset_in_child() -> None:
    """In a forked child: the default action where memprof's handler is in place (one the
    script set since - its own SIGTERM handler, SIGINT ignored before a Pool - stays)."""
    if _ACTIVE:
        for sig, default in _HANDLED:
            handler = _REAL_GETSIGNAL(sig)
            if _ours(handler):
                try:
                    _REAL_SIGNAL(sig, default)
                except (ValueError, OSError):   # (forked from a thread Python does not
                    pass                        # call main)
    _ACTIVE.clear()
    _after_fork_in_parent()   # the mask as it was (a pending SIGTERM now ends the child)


class ExitSignals:
    """`with ExitSignals() as signals: ... signals.finish() ...`; then signals.status(s)."""

    def __init__(self, process_ends: bool = False):
        self.finishing = False
        self.noted: int | None = None   # a signal that arrived while finishing
        self._previous: dict[int, object] = {}
        self._process_ends = process_ends
        self._scripts: dict[int, object] = {}   # the script's handlers when its code ended
        # signal.signal / getsignal stood in for (by the outermost one): restored checked,
        # one the script replaced meanwhile stays the script's
        self._patches = PatchRegistry()

    def __enter__(self) -> "ExitSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig, default in _HANDLED:
            handler = _REAL_GETSIGNAL(sig)
            # another ExitSignals' handler: a forked child's (cli.spawned), which inherited
            # the parent's, whose profile is not the child's to save
            if handler is default or _ours(handler):
                self._previous[sig] = _REAL_SIGNAL(sig, self._handle)
        if self._previous:
            if not _ACTIVE:
                self._patches.set(signal, "signal", _signal)
                self._patches.set(signal, "getsignal", _getsignal)
            _ACTIVE.append(self)
            if not _FORK_HOOK[0] and hasattr(os, "register_at_fork"):
                os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                                    after_in_child=_reset_in_child)
                _FORK_HOOK[0] = True
        return self

    def __exit__(self, *exc) -> bool:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._patches.restore()
        for sig, handler in self._previous.items():
            script = self._scripts.get(sig) if self._process_ends else None
            _REAL_SIGNAL(sig, handler if script is None or _ours(script) else script)
        return False

    def finish(self) -> None:
        """The script has ended: from here on signals are noted, not raised (and ours are back
        in place if the script installed its own, which __exit__ puts back)."""
        if not self.finishing:
            self._scripts = {sig: _REAL_GETSIGNAL(sig) for sig in self._previous}
        self.finishing = True
        for sig in self._previous:
            _REAL_SIGNAL(sig, self._handle)

    def status(self, status: int, stopped_by: int | None = None) -> tuple[int, int | None]:
        """(exit status, the signal the process is to end by, or None): a signal noted while
        finishing wins over the script's end, then the signal that stopped the script."""
        signum = self.noted if self.noted is not None else stopped_by
        return (EXIT_STATUS[signum], signum) if signum is not None else (status, None)

    def _handle(self, signum, frame) -> None:
        if self.finishing:
            if self.noted is None:   # os.write: print() may be in use by the interrupted code
                os.write(2, b"memprof: signal received; exiting once the profile is saved\n")
            self.noted = signum
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        _default_sigchld()
        raise Terminated(signum)


def _ours(handler) -> bool:
    return isinstance(getattr(handler, "__self__", None), ExitSignals)


def _as_the_script_sees(sig, handler):
    """memprof's handler, as the default action it stands in for."""
    default = _DEFAULTS.get(sig)
    return default if default is not None and _ours(handler) else handler


def _getsignal(signalnum):
    """signal.getsignal while memprof's handlers are in place (see the module docstring)."""
    return _as_the_script_sees(signalnum, _REAL_GETSIGNAL(signalnum))


def _signal(signalnum, handler):
    """signal.signal while memprof's handlers are in place: the default of a signal memprof
    handles puts memprof's handler back (the profile is still saved at that signal)."""
    default = _DEFAULTS.get(signalnum)
    active = _ACTIVE[-1] if _ACTIVE else None
    if active is not None and signalnum in active._previous and default is not None and \
            (handler is default or (not callable(default) and handler == default)) and \
            threading.current_thread() is threading.main_thread():
        handler = active._handle
    return _as_the_script_sees(signalnum, _REAL_SIGNAL(signalnum, handler))


def _default_sigchld() -> None:
    """SIGCHLD back to its default action once the script is stopped by a signal (see the
    module docstring): torch's DataLoader handler raises for a worker that died of it."""
    if hasattr(signal, "SIGCHLD") and callable(_REAL_GETSIGNAL(signal.SIGCHLD)):
        try:
            _REAL_SIGNAL(signal.SIGCHLD, signal.SIG_DFL)
        except (ValueError, OSError):
            pass
