"""One rank of a printed plan script run under memprof.track (tests/plan/test_rank_layout.py):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tracked_script_job.py \
        OUT_DIR script.py

Runs the script as `python script.py` would, inside `memprof.track(auto_modules=True)`, and
writes OUT_DIR/rank<R>.json: the bytes memprof saw alive per category when the script ended
(the model and its optimizer still held by the script's globals), and the bytes of this rank's
optimizer state counted from the optimizer itself (ZeroRedundancyOptimizer: its local shard).
"""
from __future__ import annotations

import faulthandler
import json
import os
import runpy
import sys

import torch

import memprof

HANG_S = 150


def _state_bytes(opt) -> int:
    """Bytes of the tensors in an optimizer's state (a ZeroRedundancyOptimizer's local one)."""
    inner = getattr(opt, "optim", opt)
    return sum(v.untyped_storage().nbytes() for s in inner.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def main(out_dir: str, script: str) -> None:
    faulthandler.dump_traceback_later(HANG_S, exit=True)   # a hang fails with its stack
    rank = int(os.environ["RANK"])
    with memprof.track(auto_modules=True) as prof:
        ns = runpy.run_path(script, run_name="__main__")
        counted = _state_bytes(ns["opt"])
    facts = {"alive_at_end": prof.breakdown("category", at="end"),
             "optimizer_state_counted": counted,
             "parameters_counted": sum(p.numel() * p.element_size()
                                       for p in ns["model"].parameters())}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
