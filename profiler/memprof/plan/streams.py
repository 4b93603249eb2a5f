"""The allocation stream of an estimated step, in the variants a training run goes through.

'first': the step as recorded (the optimizer state is created inside it); 'steady': the
optimizer state allocated before the step (every step after the first); 'accumulate': the
gradients too (micro-steps 2..A of gradient accumulation). `reserved_peak` replays a stream
through the caching-allocator model.
"""
from __future__ import annotations

import numpy as np

from ..profile import Profile
from ..record.events import CAT_GRADIENTS, CAT_OPTIMIZER_STATE, PREEXISTING_THREAD
from .allocator import simulate

__all__ = ["VARIANTS", "step_stream", "reserved_peak"]

VARIANTS = ("first", "steady", "accumulate")


def step_stream(profile: Profile, variant: str = "first") -> tuple[np.ndarray, np.ndarray]:
    """(ptr, size) of the profile's allocations, reordered for a variant of the step (see the
    module docstring)."""
    mem = profile.memory
    size = profile.effective_size.copy()
    alloc_of = profile.alloc_of
    idx = np.arange(mem.size)
    token = np.where(size < 0, alloc_of, idx).astype(np.int64)
    token[token < 0] = idx[token < 0]
    ptr = token.astype(np.uint64) + np.uint64(1)
    if variant == "first":
        return ptr, size
    cats = profile.category
    move_cats = [CAT_OPTIMIZER_STATE] + ([CAT_GRADIENTS] if variant == "accumulate" else [])
    moved = (size > 0) & np.isin(cats, move_cats) & (mem["thread"] != PREEXISTING_THREAD)
    if variant not in ("steady", "accumulate"):
        raise ValueError(f"variant: expected 'first', 'steady' or 'accumulate', got {variant!r}")
    base = mem["thread"] == PREEXISTING_THREAD
    order = np.concatenate([idx[base], idx[moved], idx[~base & ~moved]])
    return ptr[order], size[order]


def reserved_peak(ptr: np.ndarray, size: np.ndarray) -> int:
    """Peak reserved bytes of the caching-allocator model replaying (ptr, size)."""
    return int(simulate((ptr, size), return_timeline=False).peak_reserved)
