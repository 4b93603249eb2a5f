"""What the corpus loops share: one way to track them, small random data, a case record.

Every loop tracks itself (`with tracked(...) as prof:` inside the loop's own function) so that
holder names start where a user's would: at the frame that ran the block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import memprof

F32 = 4


def tracked(model=None, optimizer=None, **kwargs):
    """memprof.track as the corpus runs it: health on (so the scheduler and warmup checks run
    too), module hooks on the model, or on every module when there is no single model."""
    kwargs.setdefault("health", True)
    if model is None:
        kwargs.setdefault("auto_modules", True)
    return memprof.track(model, optimizer, **kwargs)


def loader(*tensors, batch_size: int, shuffle: bool = False):
    """A DataLoader over random tensors, as the examples load MNIST (nothing downloaded)."""
    data = torch.utils.data.TensorDataset(*tensors)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle)


@dataclass
class Case:
    """One corpus loop. `run()` returns the profile (a buggy loop: and the bytes the bug pins,
    computed from its shapes). A buggy case names the one finding it must give: its kind, its
    holder (None for advice that has no Python holder) and what its fix must say."""
    name: str
    source: str
    run: Callable
    kind: str | None = None
    holder: str | None = None
    fix: str | None = None        # what the fix text must say for this holder

    @property
    def buggy(self) -> bool:
        return self.kind is not None
