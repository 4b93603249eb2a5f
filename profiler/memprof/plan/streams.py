"""The allocation stream of an estimated step, in the variants a training run goes through.

'first': the step as recorded (the optimizer state is created inside it); 'steady': the
optimizer state allocated before the step (every step after the first); 'accumulate': the
gradients too (micro-steps 2..A of gradient accumulation). `reserved_peak` replays a stream
through the caching-allocator model.
"""
from __future__ import annotations

import numpy as np

from ..profile import Profile
from ..record.events import (CAT_GRADIENTS, CAT_OPTIMIZER_STATE, CATEGORIES,
                             PREEXISTING_THREAD)
from .allocator import simulate

__all__ = ["VARIANTS", "step_order", "step_stream", "live_by_category", "reserved_peak"]

VARIANTS = ("first", "steady", "accumulate")


def free_tokens(profile: Profile) -> np.ndarray:
    """Per event, the index of the allocation it is (an allocation: its own; a free: the one
    it releases; a free of a block from before: its own index)."""
    idx = np.arange(profile.memory.size)
    token = np.where(profile.effective_size < 0, profile.alloc_of, idx).astype(np.int64)
    token[token < 0] = idx[token < 0]
    return token


def canonical_order(size: np.ndarray, token: np.ndarray) -> np.ndarray:
    """The events' order with each run of consecutive frees sorted by the allocation each
    releases. Frees with no allocation between them happen at once (a dict of tensors
    emptied: autocast's weight casts at the forward's end, in an order set by their
    addresses, which differs from run to run); in this order two runs of one step line up
    event by event, and the live bytes between allocations are the same."""
    free = size < 0
    if not free.any():
        return np.arange(size.size)
    # each event's run: the allocations before it (a free shares the allocation's before
    # it); within a run the allocation, then its frees by the allocation each releases
    run = np.cumsum(~free)
    return np.lexsort((np.where(free, token, 0), free, run))


def step_order(profile: Profile, variant: str = "first",
               tokens: np.ndarray | None = None) -> np.ndarray:
    """The profile's events in the order of a variant of the step (see the module
    docstring); frees that happen at once in canonical order (canonical_order). `tokens`:
    free_tokens(profile), where the caller has them."""
    mem = profile.memory
    size = profile.effective_size
    canon = canonical_order(size, free_tokens(profile) if tokens is None else tokens)
    if variant == "first":
        return canon
    if variant not in ("steady", "accumulate"):
        raise ValueError(f"variant: expected 'first', 'steady' or 'accumulate', got {variant!r}")
    cats = profile.category
    move_cats = [CAT_OPTIMIZER_STATE] + ([CAT_GRADIENTS] if variant == "accumulate" else [])
    moved = (size > 0) & np.isin(cats, move_cats) & (mem["thread"] != PREEXISTING_THREAD)
    base = mem["thread"] == PREEXISTING_THREAD
    return np.concatenate([canon[base[canon]], canon[moved[canon]],
                           canon[~base[canon] & ~moved[canon]]])


def step_stream(profile: Profile, variant: str = "first") -> tuple[np.ndarray, np.ndarray]:
    """(ptr, size) of the profile's allocations in a variant's order (step_order)."""
    tokens = free_tokens(profile)
    order = step_order(profile, variant, tokens)
    return stream_pointers(tokens)[order], profile.effective_size[order]


def stream_pointers(tokens: np.ndarray) -> np.ndarray:
    """The allocator model's block identity per event: its allocation's token, from 1."""
    return tokens.astype(np.uint64) + np.uint64(1)


def live_by_category(size: np.ndarray, cat: np.ndarray) -> dict[str, int]:
    """Live bytes per category after the last event given (every category, zeros included,
    as Profile.breakdown gives them): a step's categories at its peak, given the events up
    to the peak."""
    sums = np.bincount(cat.astype(np.int64), weights=size.astype(np.float64),
                       minlength=len(CATEGORIES))
    return {name: int(sums[code]) for code, name in enumerate(CATEGORIES)}


def reserved_peak(ptr: np.ndarray, size: np.ndarray) -> int:
    """Peak reserved bytes of the caching-allocator model replaying (ptr, size)."""
    return int(simulate((ptr, size), return_timeline=False).peak_reserved)
