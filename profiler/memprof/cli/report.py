"""`memprof report run.memprof`: the report of a saved profile, exports, a CI gate."""
from __future__ import annotations

import argparse
import json
import sys

from ..report import PROFILE_EXPORTS
from .base import Command, UsageError, at_least_one, check_export


#: what --budget takes (report and run)
BUDGET_FORMS = ("a name from `memprof gpus`; a size such as 16GiB or 16GB: a GPU of that much "
                "memory, CUDA's context and reserve taken off (GB is 10^9 bytes: what is sold "
                "as a 16 GB GPU has 16 GiB, as its name in `memprof gpus` says); or a number "
                "of bytes, usable as given")


class ReportCommand(Command):
    name = "report"
    help = "print the report of a saved profile"
    description = ("Print the report of a profile saved by memprof.track(path=...) or memprof "
                   "run; optionally export it and fail when it has findings. Several files "
                   "(the ranks of one torchrun job, e.g. run.rank*.memprof) are merged into "
                   "one report: peak per rank, imbalance, findings once with their ranks.")
    own_code_only = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("profile", nargs="+",
                            help="a .memprof file, or the files of one job's ranks")
        parser.add_argument("--json", action="store_true", help="print the summary as JSON")
        parser.add_argument("--top", type=at_least_one, default=8,
                            help="rows per table (default 8)")
        parser.add_argument("--export", action="append", metavar="FILE",
                            help="also export (.json Chrome trace, .html report, .pickle "
                                 "snapshot; of several ranks' files: .html, or .json the "
                                 "merged summary)")
        parser.add_argument("--fail-on-findings", action="store_true",
                            help="exit with status 3 when there are warnings or errors (CI)")
        parser.add_argument("--budget", metavar="GPU",
                            help=f"replay the profile against a GPU's usable memory "
                                 f"({BUDGET_FORMS}): whether and where it would run out, and "
                                 "what would fit (estimates)")

    def run(self, args) -> int:
        import memprof
        from memprof.analyse import summary
        if len(args.profile) > 1:
            return _run_merged(args)
        for path in args.export or []:
            check_export(path, "--export", PROFILE_EXPORTS)
        prof = memprof.load(args.profile[0])
        if args.budget:
            _apply_budget(prof, args.budget)
        if args.json:
            print(json.dumps(summary(prof), indent=1, default=str))
        else:
            memprof.show(prof, top=args.top)
        for path in args.export or []:   # (with --json, stdout holds the document alone)
            print(f"exported {memprof.export(prof, path)}",
                  file=sys.stderr if args.json else sys.stdout)
        if args.fail_on_findings and memprof.findings(prof):
            return 3
        return 0


def _run_merged(args) -> int:
    """Several files: the ranks of one job, merged (memprof.analyse.ranks)."""
    import memprof
    from memprof.analyse.ranks import merge_ranks
    if args.budget:
        raise UsageError(f"--budget: replays one profile; got {len(args.profile)} files "
                         "(give one rank's file)")
    for path in args.export or []:
        check_export(path, "--export", (".html", ".json"))
    merged = merge_ranks([memprof.load(p) for p in args.profile], sources=args.profile)
    if args.json:
        print(json.dumps(merged.summary(), indent=1, default=str))
    else:
        memprof.show(merged, top=args.top)
    for path in args.export or []:
        print(f"exported {memprof.export(merged, path)}",
              file=sys.stderr if args.json else sys.stdout)
    if args.fail_on_findings and any(f.severity in ("error", "warning")
                                     for f in merged.findings):
        return 3
    return 0


def parse_budget(spec: str | None):
    """--budget: a GPU name (or capacity like 24gb) or a number of bytes; checked now."""
    if spec is None:
        return None
    from memprof import track_budget
    try:
        value = float(spec.strip())          # bytes: 80000000000 or 8e10
    except ValueError:
        budget = spec                        # a GPU name or a capacity such as 24gb
    else:
        if not (value.is_integer() and value > 0):
            raise UsageError(f"--budget {spec}: expected a whole number of bytes > 0, a GPU "
                             "name or a capacity such as 24gb")
        budget = int(value)
    try:
        track_budget.check(budget)
    except ValueError as err:
        raise UsageError(f"--budget {spec}: {err}") from None
    return budget


def _apply_budget(prof, spec: str) -> None:
    from memprof import track_budget
    track_budget.apply(prof, parse_budget(spec))


COMMAND = ReportCommand()
