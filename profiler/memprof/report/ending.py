"""How the tracked code ended, in words every report uses: an exception it raised, its own
`sys.exit(n)` (an exit status the code chose is not a crash, and reads as one in no report),
or no end at all - a profile saved while the run went on (memprof.track_autosave) that the
run's own save never replaced."""
from __future__ import annotations

import ast

_EXIT = "SystemExit: "
#: why a profile saved while its run went on was never replaced by the run's own save
NEVER_REPLACED = ("killed outright (SIGKILL: the kernel's OOM killer, exit status 137, or "
                  "kill -9), crashed in native code, could not write its last save, or is still "
                  "running")


def ending(error: str) -> tuple[str, bool]:
    """(the sentence, whether it was a crash) for a profile's meta["error"]."""
    if error.startswith(_EXIT):
        code = error[len(_EXIT):]
        try:   # the value's repr (a profile of an older memprof: its str)
            code = repr(ast.literal_eval(code))
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            code = repr(code)
        return f"The tracked code ended with sys.exit({code})", False
    return f"The tracked code raised: {error}", True


def unfinished(partial: dict) -> str:
    """The sentence for a profile's meta["partial"]: saved while the run went on, and the run
    never saved its end."""
    steps = int(partial.get("steps_ended", 0))
    when = partial.get("elapsed_s")
    at = f"{steps} step{'s' if steps != 1 else ''} ended" + \
        (f", {float(when):.0f} s into the block" if when is not None else "")
    return (f"Saved while the run was still going ({at}); the run never saved its end: it was "
            f"{NEVER_REPLACED}. What came after is not here.")
