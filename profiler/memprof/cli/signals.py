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
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
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
        raise Terminated(signum)
