"""A nested block's steps numbered from its own start. A script's own `memprof.track` under
`memprof run` records on the outer block's hooks, whose step count runs from the script's
start: its profile's first step read as the outer run's step k (its peak "at step 3", its
health and `prof.log` rows 3, 4, ...), where python numbers it 0. Done once, as the block's
Run is made; the outer block's own numbering is left as it was.

What moves: the events' steps, the values of the markers that name a step (STEP_MARKS), the
step boundaries (from the block's start), the backward() calls, the logs, the health record,
the leak probe's look, memprof's pauses (PAUSES), the lent live looks' and compile record's
steps, the steps a GradScaler skipped and the steps' optimizers; records["first_step"]
is then 0 (analyse still subtracts it for files saved before, numbered as the outer's) and
meta["outer_first_step"] says where the block began in the outer's numbering."""
from __future__ import annotations

import numpy as np

from .profile_schema import PAUSES
from .record.events import KIND_MARK

#: the markers whose value is a step number (the others': a batch's size, a snapshot's
#: category, a time in ns, 0)
STEP_MARKS = frozenset((
    "forward_start", "forward_end", "backward_call", "backward_end", "optimizer_start",
    "step", "reevaluation_start", "reevaluation_end", "data_start", "data_end",
    "compile_start", "compile_end", "leak_probe"))


def own_numbering(streams, strings: list[str], step_seqs: list[int], records: dict,
                  meta: dict) -> list[int]:
    """Renumber in place (the block's own copies) -> its step boundaries."""
    first = int(records.get("first_step") or 0)
    if first <= 0:
        return step_seqs
    records["first_step"], meta["outer_first_step"] = 0, first
    records["step_owners"] = list(records.get("step_owners") or [])[first:]
    records["skipped_steps"] = [s - first for s in records.get("skipped_steps") or []
                                if s >= first]
    for part in (streams.memory, streams.side):
        part["step"] = np.maximum(part["step"].astype(np.int64) - first, 0)
    side = streams.side
    labels = [i for i, s in enumerate(strings) if s in STEP_MARKS]
    if labels:
        marks = (side["kind"] == KIND_MARK) & np.isin(side["op"], labels)
        side["ptr"][marks] = np.maximum(side["ptr"][marks].astype(np.int64) - first, 0)
    records["backward"] = [{**c, "step": c["step"] - first}
                           for c in records.get("backward") or [] if c["step"] >= first]
    for name, key in PAUSES:   # memprof's own pauses, by the step whose window they open
        rec = records.get(name)
        if isinstance(rec, dict) and rec.get(key):
            records[name] = {**rec, key: [[n - first, *rest] for n, *rest in rec[key]
                                          if n >= first]}
    for name in ("untrained_gradients", "parameters_without_gradients"):   # lent looks'
        rec = records.get(name)
        if isinstance(rec, dict) and rec.get("steps") is not None:
            records[name] = {**rec, "steps": max(0, rec["steps"] - first)}
    if records.get("compile"):   # lent: the steps torch.compile compiled in
        rec = records["compile"]
        windows = [[s - first, t] for s, t in rec["windows"] if s >= first]
        records["compile"] = {**rec, "steps": [s - first for s in rec["steps"] if s >= first],
                              "windows": windows,
                              "seconds": round(sum(t for _, t in windows), 6)}
    records["logs"] = [[s - first, name, v] for s, name, v in records.get("logs") or []
                       if s >= first]
    if records.get("health"):
        records["health"] = _health(records["health"], first)
    look = records.get("leak_probe")
    if look and look.get("completed_steps") is not None:
        records["leak_probe"] = {**look, "completed_steps": look["completed_steps"] - first}
    return list(step_seqs[first:])


def _health(rec: dict, first: int) -> dict:
    """record.health's record from the block's first step: what the outer recorded before
    it is not the block's (a health=True asked of both)."""
    mine = [i for i, (s, _) in enumerate(rec["losses"]) if s >= first]
    return {**rec,
            "grad": [[s - first, *rest] for s, *rest in rec["grad"] if s >= first],
            "clips": [{**c, "step": c["step"] - first} for c in rec["clips"]
                      if c["step"] >= first],
            "value_clips": [[s - first, v] for s, v in rec["value_clips"] if s >= first],
            "losses": [[rec["losses"][i][0] - first, rec["losses"][i][1]] for i in mine],
            "loss_divisors": [rec["loss_divisors"][i] for i in mine
                              if i < len(rec["loss_divisors"])],
            "loss_unscaled": [rec["loss_unscaled"][i] for i in mine
                              if i < len(rec["loss_unscaled"])],
            "timeline": [[ev[0], ev[1] - first, *ev[2:]] for ev in rec["timeline"]
                         if ev[1] >= first]}
