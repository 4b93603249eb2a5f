"""`memprof demo`: the story of seeds/000 end to end, on a built-in model."""
from __future__ import annotations

import argparse

from .base import Command


class DemoCommand(Command):
    name = "demo"
    help = "the story of seeds/000 end to end, on a built-in model"
    description = ("A retained attention-map graph found and named, the fix, fused vs math "
                   "attention, and what fits a 16 GB V100 - in under 3 minutes on 2 cores.")
    own_code_only = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--quick", action="store_true", help="fewer steps (for tests)")

    def run(self, args) -> int:
        from memprof.demo import run_demo
        return run_demo(quick=args.quick)


COMMAND = DemoCommand()
