"""What `memprof run` prints once the script ended: the report (one per job: rank 0's, the
other ranks one line each), and where the profile went."""
from __future__ import annotations

import json
import os
import re
import sys

from ..units import fmt_bytes


def print_report(tracker, output: str, status: int, as_json: bool,
                 process_index: int | None = None, brief: bool = False,
                 base: str | None = None) -> int:
    """The report of a tracked run and where it was saved; returns the exit status (1 when
    the profile could not be saved and the script had succeeded). `process_index`: a process
    torch.multiprocessing started (cli.spawned), a rank when torch.distributed did not say.
    `brief`: one line for a parent whose processes did the work (theirs are the reports).
    `base`: the directory `memprof run` started in, which paths are shown from."""
    import memprof
    from memprof.analyse import summary
    out = sys.stderr if as_json else sys.stdout
    rank = tracker.profile.meta.get("rank") if tracker.profile is not None else None
    if rank is None:
        rank = process_index
    if tracker.profile is not None:
        if brief and not as_json:
            print(f"memprof: this process's own peak {fmt_bytes(tracker.profile.peak)} (no "
                  "model ran in it)", file=out)
        elif rank or (process_index is not None and as_json):
            # one report per job: rank 0's, the others one line (with --json the parent's
            # summary is the run's one document)
            print(f"memprof: rank {rank} peak {fmt_bytes(tracker.profile.peak)}", file=out)
        elif as_json:
            print(json.dumps(summary(tracker), indent=1, default=str))
        else:
            memprof.show(tracker, console=_report_console())
    if tracker.saved is not None:   # under torchrun: <output>.rank<R>.memprof
        saved = shown_path(tracker.saved, base)
        print(f"profile saved to {saved}" + (f" instead: {tracker.save_error}"
                                              if tracker.save_error else ""), file=out)
        if rank == 0 and not as_json and process_index is None:   # (spawned: the parent says)
            print(f"merge the ranks: memprof report {rank_glob(saved)}")
        # saved elsewhere (the temporary directory): not where -o said
        return status or (1 if tracker.save_error else 0)
    if tracker.kept_existing:   # nothing recorded: the file of the run before is kept
        return status
    if tracker.save_error:   # said before the report too, where it scrolled away
        print(f"memprof: the profile was not saved: {tracker.save_error}", file=sys.stderr)
    elif tracker.profile is None:   # else the tracker said why it could not save
        print(f"memprof: the profile was not saved to {shown_path(output, base)}",
              file=sys.stderr)
    return status or 1


def shown_path(path: str, base: str | None) -> str:
    """A path as the user gave it: relative to `base` (where memprof run started) when it lies
    there, else absolute."""
    if base is not None:
        rel = os.path.relpath(path, base)
        if not rel.startswith(os.pardir):
            return rel
    return path


def rank_glob(saved: str) -> str:
    """`run.rank0.memprof` -> `run.rank*.memprof`: every rank's file of the job."""
    return re.sub(r"\.rank\d+(\.[^.]*)$", r".rank*\1", saved)


def _report_console():
    """rich's console, save that a closed pipe is an error run() handles (rich exits with
    status 1, where Python's own output into `| head` left the status 0)."""
    from rich.console import Console

    class ReportConsole(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError
    return ReportConsole()
