"""Memory that grows step after step: the slope, when it runs out, and what is accumulating.

Warm-up steps are excluded (the first optimizer step creates its state lazily; the first
steps fill caches), then live bytes at each step boundary are fitted with a line. A finding
needs steady growth, not noise: most increments positive and the total above a floor.
"""
from __future__ import annotations

import os

import numpy as np

from .. import _C
from ..finding import Finding
from ..profile import Profile
from ..record.events import (CAT_COMMUNICATION, CAT_GRADIENTS, CAT_OPTIMIZER_STATE,
                             CAT_PARAMETERS, DEVICE_CUDA)
from ..record.holders import reachable_tensors
from ..record.snapshots import storage_ptrs
from ..units import fmt_bytes
from .leaks import LEAK_KINDS, holder_roots, root_holder

WARMUP_STEPS = 1
MIN_STEPS = 3                 # boundaries after warm-up needed to call a trend
MIN_GROWTH_FRACTION = 0.01    # of peak, over the observed steps
MIN_GROWTH_BYTES = 4096
JUMP_CHECK_STEPS = 5          # step-to-step changes needed to leave one jump out
EXPLAINED_FRACTION = 0.5      # leak findings pinning this share of the growth explain it


def device_capacity(profile: Profile) -> tuple[int, str]:
    """Bytes the analysed device can hold, and where that number comes from."""
    if profile.device_type == DEVICE_CUDA:
        try:
            import torch
            index = int(profile.memory["device_index"][-1]) if profile.memory.size else 0
            index = max(index, 0)
            return (int(torch.cuda.get_device_properties(index).total_memory),
                    f"CUDA device {index}")
        except Exception:  # noqa: BLE001
            pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical RAM"
    except (ValueError, OSError, AttributeError):
        return 0, "unknown"


def memory_growth(profile: Profile, capacity: int | None = None) -> list[Finding]:
    steps = [s for s in profile.steps if s.index >= WARMUP_STEPS]
    # only complete steps (closed by a boundary) carry a meaningful live_at_end
    bounded = len(profile.marker_positions("step"))
    steps = [s for s in steps if s.index < bounded]
    if len(steps) < MIN_STEPS:
        return []
    # parameters, gradients and optimizer state are the model's, not growth: an optimizer
    # that builds up its state (LBFGS's history, bounded by history_size) is not a leak.
    # Communication buffers are the backend's, freed by its own threads: memprof sees those
    # frees on the CPU (the native hook follows a free to any thread), but a CUDA block freed
    # on NCCL's watchdog thread is reported to no one, so it would look alive.
    named = np.isin(profile.category, [CAT_PARAMETERS, CAT_GRADIENTS, CAT_OPTIMIZER_STATE,
                                       CAT_COMMUNICATION])
    named_live = np.cumsum(np.where(named, profile.effective_size, 0), dtype=np.int64)
    y = np.array([s.live_at_end - (named_live[s.end - 1] if s.end > 0 else 0)
                  for s in steps], dtype=np.float64)
    x = np.arange(len(y), dtype=np.float64)
    slope = float(np.polyfit(x, y, 1)[0])
    incs = np.diff(y)
    total = y[-1] - y[0]
    floor = max(MIN_GROWTH_BYTES, MIN_GROWTH_FRACTION * profile.peak)
    if slope <= 0 or total < floor or (incs > 0).mean() < 0.75:
        return []
    # One step's jump is no trend: a best checkpoint kept as a copy once, beside a list that
    # grows and is reset every epoch, read as growth (and its fix blamed the copy). Where
    # there are enough steps to tell, the growth must pass the floor without the largest rise.
    if incs.size >= JUMP_CHECK_STEPS and total - max(float(incs.max()), 0.0) < floor:
        return []
    if capacity is None:
        capacity, source = device_capacity(profile)
    else:
        source = "given capacity"
    last = steps[-1]
    projection = ""
    evidence = {"slope_bytes_per_step": slope, "steps_observed": len(steps),
                "live_at_step_ends": [int(v) for v in y]}
    if capacity and slope > 0:
        # the peak grows with the baseline: the step peak hits capacity first
        headroom = capacity - last.peak
        runs_out = last.index + max(0, int(np.ceil(headroom / slope)))
        projection = f"; at this rate the {source} ({fmt_bytes(capacity)}) runs out at step ~{runs_out}"
        evidence.update(capacity=int(capacity), capacity_source=source,
                        projected_step=int(runs_out))
    later = _alive_from_later_steps(profile, first_step=steps[0].index)
    culprits = _by_origin(profile, later)
    evidence["still_alive"] = culprits
    who = ", ".join(f"{c['op']} in {c['module']} ({c['phase']}): {fmt_bytes(c['bytes'])}"
                    for c in culprits[:3])
    holders = _holders_of(profile, later)
    held = ""
    if holders:
        evidence["holders"] = [{"holder": h, "bytes": b} for h, b in holders[:5]]
        held = ". Held by " + ", ".join(f"{h} ({fmt_bytes(b)})" for h, b in holders[:3])
    return [Finding(
        kind="memory_growth", severity="error" if (incs > 0).all() else "warning",
        bytes=int(total), holder=holders[0][0] if holders else None,
        message=(f"live memory grows by {fmt_bytes(slope)} per step over {len(steps)} steps "
                 f"({fmt_bytes(y[0])} -> {fmt_bytes(y[-1])}){projection}"
                 + (f". Still alive from those steps: {who}" if who else "") + held),
        fix=_growth_fix(culprits, holders[0][0] if holders else None),
        evidence=evidence)]


def _holders_of(profile: Profile, alive: np.ndarray) -> list[tuple[str, int]]:
    """Who holds those allocations, where the block's objects are still there to ask (a run
    tracked in this process): the tensors the named roots reach whose storage is one of them,
    bytes per holder, largest first. A detached feature bank has no graph for the retained-
    graph check to follow, but a name still reaches it."""
    live = profile.run.live
    if live is None or not alive.size:
        return []
    size_at = dict(zip(profile.memory["ptr"][alive].tolist(),
                       profile.memory["size"][alive].tolist()))
    held: dict[str, int] = {}
    counted: set[int] = set()
    with _C.untraced():   # a walk of the user's objects: not the user's tracer's events
        reached = list(reachable_tensors(holder_roots(live)))
    # addresses as snapshots read them: a tensor allocated past a full log's end is not the
    # logged block that had its address (that block's free was dropped)
    ptrs = storage_ptrs([t for _, t in reached])
    for (path, _), ptr in zip(reached, ptrs):
        if ptr in size_at and ptr not in counted:
            counted.add(ptr)
            holder = root_holder(path)
            held[holder] = held.get(holder, 0) + int(size_at[ptr])
    ranked = sorted(held.items(), key=lambda kv: -kv[1])
    # the last step's own tensors (its batch, its output) are alive too: not holders of growth
    return [(h, b) for h, b in ranked if b >= 0.1 * ranked[0][1]] if ranked else []


def _growth_fix(culprits: list[dict], holder: str | None = None) -> str:
    """What to look for; memory made in backward and kept is a .grad that is not a
    parameter's (a parameter's gradient is counted apart): an input given requires_grad, or
    retain_grad(), whose .grad every backward adds to (its tensor kept in a dataset list)."""
    if holder is not None:
        fix = (f"{holder} keeps a tensor from every step: bound it (a deque(maxlen=...), a "
               "fixed-size buffer), keep numbers (`.item()`) or move what it keeps to the CPU "
               "if it is meant to grow")
    else:
        fix = ("find who keeps these allocations (a retained_graph finding names the holder "
               "when a graph is kept): detach or drop per-step tensors kept in lists, dicts "
               "or running totals")
    if culprits and culprits[0]["phase"] == "backward":
        fix += ("; memory made in backward and kept is often the .grad of a tensor that is "
                "not a parameter (an input with requires_grad=True, or retain_grad()): set "
                "requires_grad only where needed, or set that .grad to None after use")
    return fix


def unexplained_growth(profile: Profile) -> list[Finding]:
    """The default analysis: memory_growth, unless the leak findings already made (they run
    first) pin most of what grew; then the growth is said in the largest of them (one
    finding per cause, not two)."""
    found = memory_growth(profile)
    leaks = [f for f in profile.findings if f.kind in LEAK_KINDS]
    if not found or not leaks or sum(f.bytes for f in leaks) < EXPLAINED_FRACTION * found[0].bytes:
        return found
    slope = found[0].evidence["slope_bytes_per_step"]
    main = max(leaks, key=lambda f: f.bytes)
    main.evidence["growth_bytes_per_step"] = slope
    main.message += f"; live memory grows by {fmt_bytes(slope)} per step"
    return []


def _alive_from_later_steps(profile: Profile, first_step: int) -> np.ndarray:
    """Allocations made at or after `first_step` and alive at the end, but the model's own
    (parameters, gradients, optimizer state)."""
    alive = profile.alive_at("end")
    mem = profile.memory
    return alive[(mem["step"][alive] >= first_step)
                 & ~np.isin(profile.category[alive],
                            [CAT_PARAMETERS, CAT_GRADIENTS, CAT_OPTIMIZER_STATE])]


def _by_origin(profile: Profile, keep: np.ndarray) -> list[dict]:
    """Those allocations' bytes by op/module/phase, largest first (ten)."""
    mem = profile.memory
    groups: dict[tuple, int] = {}
    for i in keep:
        d = profile.describe_event(int(i))
        key = (d["op"], d["module"], d["phase"])
        groups[key] = groups.get(key, 0) + int(mem["size"][i])
    out = [{"op": k[0], "module": k[1], "phase": k[2], "bytes": b}
           for k, b in sorted(groups.items(), key=lambda kv: -kv[1])]
    return out[:10]
