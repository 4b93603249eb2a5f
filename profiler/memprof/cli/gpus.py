"""`memprof gpus`: the GPU table `recommend` plans with."""
from __future__ import annotations

import argparse
import json

from .base import Command


class GpusCommand(Command):
    name = "gpus"
    help = "the GPU table used by `recommend`"
    description = ("The GPUs memprof knows: memory as torch reports it, usable memory after "
                   "the CUDA context, peak FLOPs per precision and memory bandwidth.")
    own_code_only = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", action="store_true", help="print the table as JSON")

    def run(self, args) -> int:
        from memprof.plan import gpus
        print(json.dumps(gpus.table(), indent=1) if args.json else gpus.format_table())
        return 0


COMMAND = GpusCommand()
