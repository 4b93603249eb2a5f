"""`memprof report run.memprof`: the report of a saved profile, exports, a CI gate."""
from __future__ import annotations

import argparse
import json

from .base import Command


class ReportCommand(Command):
    name = "report"
    help = "print the report of a saved profile"
    description = ("Print the report of a profile saved by memprof.track(path=...) or memprof "
                   "run; optionally export it and fail when it has findings.")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("profile")
        parser.add_argument("--json", action="store_true", help="print the summary as JSON")
        parser.add_argument("--top", type=int, default=8, help="rows per table (default 8)")
        parser.add_argument("--export", action="append", metavar="FILE",
                            help="also export (.json Chrome trace, .html report, .pickle "
                                 "snapshot)")
        parser.add_argument("--fail-on-findings", action="store_true",
                            help="exit with status 3 when there are warnings or errors (CI)")

    def run(self, args) -> int:
        import memprof
        from memprof.analyse import summary
        prof = memprof.load(args.profile)
        if args.json:
            print(json.dumps(summary(prof), indent=1, default=str))
        else:
            memprof.show(prof, top=args.top)
        for path in args.export or []:
            print(f"exported {memprof.export(prof, path)}")
        if args.fail_on_findings and memprof.findings(prof):
            return 3
        return 0


COMMAND = ReportCommand()
