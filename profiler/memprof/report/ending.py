"""How the tracked code ended, in words every report uses: an exception it raised, or its own
`sys.exit(n)` (an exit status the code chose is not a crash, and reads as one in no report)."""
from __future__ import annotations

_EXIT = "SystemExit: "


def ending(error: str) -> tuple[str, bool]:
    """(the sentence, whether it was a crash) for a profile's meta["error"]."""
    if error.startswith(_EXIT):
        code = error[len(_EXIT):]
        code = code if code.lstrip("-").isdigit() else repr(code)
        return f"The tracked code ended with sys.exit({code})", False
    return f"The tracked code raised: {error}", True
