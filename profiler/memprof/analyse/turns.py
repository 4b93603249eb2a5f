"""Optimizers that take turns - a GAN's discriminator then its generator, WGAN's five critic
steps per generator step, Muon and AdamW over one model's parameters - make one iteration a
round of steps, one or more of each: the unit of the loop's throughput, and the steps whose
tensors are still current for the leak check. `owners[i]` labels the optimizer that ended
step i (any int per optimizer; 0 for a boundary no optimizer made: prof.step(), auto steps).
"""
from __future__ import annotations

import collections


def last_round_start(owners: list[int], last_completed: int) -> int:
    """The first step of the last round of updates: with several optimizers stepping in turn
    (a GAN's D then G), one iteration is one step of each, and its tensors are current until
    every optimizer has stepped again. Step i ends at boundary i + 1. An optimizer that stepped
    once (a probe, a one-off prof.step()) takes no turns: it does not widen the round; nor does
    one whose steps ended before the last optimizer's began (an earlier fold's)."""
    owners = list(owners[:last_completed + 1])
    if not owners:
        return last_completed
    first, last, count = _spans(owners)
    turns = [o for o in count if count[o] > 1]
    if not turns:
        return min(last.values())
    ref = owners[-1] if count[owners[-1]] > 1 else max(turns, key=last.get)
    return min(last[o] for o in turns if first[o] <= last[ref] and first[ref] <= last[o])


def _spans(owners: list[int]) -> tuple[dict, dict, collections.Counter]:
    """(first step, last step, steps) of each owner."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, o in enumerate(owners):
        first.setdefault(o, i)
        last[o] = i
    return first, last, collections.Counter(owners)


def rounds(owners: list[int]) -> list[list[int]] | None:
    """The steps grouped into rounds where two or more optimizers take turns (each stepped
    more than once): a round ends with each step of the one that steps least often (the
    generator, once per five critic steps; of two that step as often, the one whose first
    step came later: D, G | D, G). Steps after the last round's end are in no round. None
    where no optimizers take turns (over the whole run), or some boundary was no optimizer's."""
    if not owners or 0 in owners:
        return None
    first, last, count = _spans(owners)
    turns = [o for o, c in count.items() if c > 1]
    # taking turns: every two of them stepped in each other's span (a k-fold loop's
    # optimizers, one per fold, step one after the other)
    if len(turns) < 2 or any(first[a] > last[b] for a in turns for b in turns):
        return None
    closer = min(turns, key=lambda o: (count[o], -first[o]))
    out, current = [], []
    for i, o in enumerate(owners):
        current.append(i)
        if o == closer:
            out.append(current)
            current = []
    return out


def round_samples(steps: list[int], owners: list[int], samples: list) -> int | None:
    """Samples of one round: those of the optimizer whose steps in it saw the most - each of a
    GAN's two steps sees the batch (counted once, not twice), each of WGAN's five critic steps
    a new real batch (five, where its generator step sees one), AdamW's step after Muon's
    none of its own. None where no step of it knew its batch."""
    per: dict[int, int] = {}
    for i in steps:
        if samples[i] is not None:
            per[owners[i]] = per.get(owners[i], 0) + int(samples[i])
    return max(per.values()) if per else None
