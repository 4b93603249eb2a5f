"""One rank of the test of the plans' printed code (tests/plan/test_codegen_distributed.py):

    python -m torch.distributed.run --standalone --nproc-per-node 2 codegen_ranks_job.py \
        OUT_DIR script.py [script.py ...]

Runs each printed script in turn as `python script.py` would (each initialises and destroys
its own process group) and writes what it left behind to OUT_DIR/rank<R>.json: the wrapped
model's and optimizer's types, the optimizer steps taken, and per parameter this rank's local
element count and the sum of its local values. Each script starts from this rank's own random
state, so ranks begin with different weights and batches and only the strategy's own
synchronisation can make them agree.
"""
from __future__ import annotations

import faulthandler
import json
import os
import runpy
import sys

import torch

HANG_S = 150


def _local(p: torch.Tensor) -> torch.Tensor:
    """A parameter's values on this rank (an FSDP2 DTensor's shard, else the tensor)."""
    return p.to_local() if hasattr(p, "to_local") else p


def main(out_dir: str, scripts: list[str]) -> None:
    faulthandler.dump_traceback_later(HANG_S, exit=True)   # a hang fails with its stack
    rank = int(os.environ["RANK"])
    facts = {}
    first_port = int(os.environ["MASTER_PORT"]) + 1
    for k, path in enumerate(scripts):
        # as a fresh torchrun would give each script: a rendezvous store of its own (the
        # agent's store would still hold the keys of the previous script's process group)
        os.environ.update(TORCHELASTIC_USE_AGENT_STORE="False", MASTER_PORT=str(first_port + k))
        torch.manual_seed(1000 + rank)
        ns = runpy.run_path(path, run_name="__main__")
        model, opt = ns["model"], ns["opt"]
        params = [_local(p.detach()) for p in model.parameters()]
        facts[os.path.basename(path)] = {
            "model": type(model).__name__, "optimizer": type(opt).__name__,
            "optimizer_steps": int(ns["scheduler"].last_epoch),
            "dtensor_parameters": any(hasattr(p, "to_local") for p in model.parameters()),
            "local_numel": [int(p.numel()) for p in params],
            "local_sum": [float(p.double().sum()) for p in params],
            "finite_loss": bool(torch.isfinite(ns["loss"]).item())}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
