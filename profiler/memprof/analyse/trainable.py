"""The parameters alive at a point of the run, split into trainable (requires_grad) and
frozen: a LoRA run's one "parameters" figure lumped the frozen base with the adapters that
train (what LoRA's rank changes), so the report could not say how much of the model trains.
Parameters that no optimizer updates but that change between steps (an EMA copy of the model,
beside it or inside it: record.not_trained) are a third part: read by requires_grad they were frozen model, or
trainable (AveragedModel: the trainable bytes doubled)."""
from __future__ import annotations

import numpy as np

from ..allocation_lookup import last_per_allocation, snapshot_trainable
from ..profile import Profile
from ..record.events import CAT_PARAMETERS
from ..record.not_trained import FROZEN, NOT_TRAINED, TRAINS


#: the split's parts and how the reports name them
PARTS = (("trainable", "trainable (requires_grad)"), ("frozen", "frozen"),
         ("not_trained", "not trained (a model beside it: EMA, teacher)"))


def parameters_split(profile: Profile, at: str | int = "peak") -> dict[str, int] | None:
    """{"trainable": bytes, "frozen": bytes, "not_trained": bytes} of the parameters alive at
    `at` (each storage once: tied weights), each as the last note that named it saw it; None
    where there is nothing to split (no parameters alive) or the profile does not say (saved
    before memprof noted it)."""
    alive = profile.alive_at(at)
    alive = alive[profile.category[alive] == CAT_PARAMETERS]
    _, allocs, storage = profile.named_storages
    if not alive.size or not allocs.size:
        return None
    last = last_per_allocation(allocs)   # the note that gave each its category
    named, trains = allocs[last], snapshot_trainable(profile.snapshots)[storage[last]]
    order = np.argsort(named, kind="stable")
    named, trains = named[order], trains[order]
    i = np.minimum(np.searchsorted(named, alive), named.size - 1)
    flags = np.where(named[i] == alive, trains[i], -1)
    if (flags < 0).any():
        return None
    sizes = profile.memory["size"][alive].astype(np.int64)
    return {part: int(sizes[flags == flag].sum())
            for flag, (part, _) in ((TRAINS, PARTS[0]), (FROZEN, PARTS[1]),
                                    (NOT_TRAINED, PARTS[2]))}


def shown_parts(split: dict[str, int] | None) -> list[tuple[str, str]]:
    """The parts a report lists under "parameters": none where all of them train (no word),
    else those with bytes (the trainable part always)."""
    if not split or not (split["frozen"] or split.get("not_trained")):
        return []
    return [(part, label) for part, label in PARTS if part == "trainable" or split.get(part)]
