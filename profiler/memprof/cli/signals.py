"""Signals while `memprof run` runs a script: whatever ends the script, the profile is saved.

* SIGINT (Ctrl-C) while the script runs: KeyboardInterrupt, as without memprof.
* SIGTERM (and SIGHUP: the terminal or SSH session that ran it closed) while the script runs:
  `Terminated` is raised in the script, so the tracker saves the profile on the way out (the
  default action would kill the process first).
* SIGINT, SIGTERM or SIGHUP once the script has ended (the profile is being built, analysed, saved and
  reported): noted, not raised, so a second Ctrl-C cannot lose the profile.

Either way the process then ends as Python's would have: by the signal itself (its parent sees
it, not an exit status: a shell loop stops, subprocess returns -2), after the interpreter's
finalization (memprof.cli.console_main, `_C.exit_by_signal`); `main()` called in-process
returns 130 / 143 / 129 (128 + the signal's number) instead.

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

#: the signals handled, with what they do by default (SIGHUP: not on Windows)
_HANDLED = ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)) + \
    (((signal.SIGHUP, signal.SIG_DFL),) if hasattr(signal, "SIGHUP") else ())
EXIT_STATUS = {sig: 128 + int(sig) for sig, _ in _HANDLED}   # 130, 143, 129


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
            handler = signal.getsignal(sig)
            if isinstance(getattr(handler, "__self__", None), ExitSignals):
                try:
                    signal.signal(sig, default)
                except (ValueError, OSError):   # (forked from a thread Python does not
                    pass                        # call main)
    _ACTIVE.clear()
    _after_fork_in_parent()   # the mask as it was (a pending SIGTERM now ends the child)


class ExitSignals:
    """`with ExitSignals() as signals: ... signals.finish() ...`; then signals.status(s)."""

    def __init__(self):
        self.finishing = False
        self.noted: int | None = None   # a signal that arrived while finishing
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "ExitSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig, default in _HANDLED:
            handler = signal.getsignal(sig)
            # another ExitSignals' handler: a forked child's (cli.spawned), which inherited
            # the parent's, whose profile is not the child's to save
            if handler is default or isinstance(getattr(handler, "__self__", None),
                                                ExitSignals):
                self._previous[sig] = signal.signal(sig, self._handle)
        if self._previous:
            _ACTIVE.append(self)
            if not _FORK_HOOK[0] and hasattr(os, "register_at_fork"):
                os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                                    after_in_child=_reset_in_child)
                _FORK_HOOK[0] = True
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        return False

    def finish(self) -> None:
        """The script has ended: from here on signals are noted, not raised (and ours are back
        in place if the script installed its own)."""
        self.finishing = True
        for sig in self._previous:
            signal.signal(sig, self._handle)

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


def _default_sigchld() -> None:
    """SIGCHLD back to its default action once the script is stopped by a signal (see the
    module docstring): torch's DataLoader handler raises for a worker that died of it."""
    if hasattr(signal, "SIGCHLD") and callable(signal.getsignal(signal.SIGCHLD)):
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        except (ValueError, OSError):
            pass
