"""Out of memory, explained: who filled the device, and whether it was a leak or a step too big.

For an out-of-memory report recorded in the run (a CUDA OOM, or the CPU allocator's failure,
both reported through the same native hook), `diagnose` states:

* the failing request and where it came from (op, module, autograd node, phase, step);
* what was alive at that moment, by category and top modules (the profile's own queries at
  the memory position just before the request);
* allocated vs reserved vs the device's capacity, and the share of the reserved bytes that was
  cached but free (fragmentation); when the cache held more free bytes than the request, the
  request failed for want of one large enough block;
* the cause (`classify`, shared with `memprof.plan.budget`): memory that grew across steps (a
  leak: `analyse.growth`), a step that is too big by itself (the first step already, or a step
  that needed more than the ones before it), or one request larger than the whole device.

An OOM that came after the event log filled (a long run past `track(capacity=...)`): the log
does not hold what was alive then, so the profile's state at the log's end is not presented as
the state at the OOM. Unless the request alone is larger than the device (its own cause),
`past_the_log` says what is known - the allocator's own count at the OOM against the one at
the log's end, the growth the recorded steps show - and the capacity a run that records up to
the OOM needs.

What would fit instead is a planning question (`memprof.plan.fit`); this module stays pure.
"""
from __future__ import annotations

import numpy as np

from ..finding import Finding
from ..profile import Profile
from ..record.events import EVENT_DTYPE, KIND_MEMORY
from ..record.session import MAX_CAPACITY
from ..units import fmt_bytes
from .growth import device_capacity, memory_growth

TOP_MODULES = 5


def alive_summary(profile: Profile, position: int, top: int = TOP_MODULES) -> dict:
    """Bytes alive just after memory position `position` (-1: nothing yet), by category and
    by the top modules and ops."""
    at = ("position", position)
    by_module = profile.breakdown("module", at=at)
    by_op = profile.breakdown("op", at=at)
    by_category = profile.breakdown("category", at=at)
    return {"bytes": int(sum(by_category.values())), "by_category": by_category,
            "by_module": dict(list(by_module.items())[:top]),
            "by_op": dict(list(by_op.items())[:top])}


def classify(profile: Profile, step: int, request: int, capacity: int | None,
             capacity_source: str = "given capacity") -> dict:
    """Why memory ran out in `step`: 'growth' (live memory grew across the steps before it),
    'step_too_big' (the step alone does not fit) or 'single_request' (one request as large as
    the capacity: on a GPU the CUDA context holds part of it, so a request for all of it never
    fits either). Plain data: the cause, a sentence, and its evidence."""
    if capacity and request >= capacity:
        # "the physical RAM (23 GiB)", "a budget of 1.91 MiB": the article and the size once
        source = capacity_source if capacity_source.startswith(("a ", "an ", "the ")) \
            else f"the {capacity_source}"
        if fmt_bytes(capacity) not in source:
            source += f" ({fmt_bytes(capacity)})"
        return {"cause": "single_request", "step": step,
                "text": f"one request of {fmt_bytes(request)} is "
                        f"{'larger than' if request > capacity else 'all of'} {source} "
                        "by itself"}
    growth = memory_growth(profile, capacity=capacity or None)
    if growth and step > 0:
        ev = growth[0].evidence
        return {"cause": "growth", "step": step,
                "slope_bytes_per_step": float(ev["slope_bytes_per_step"]),
                "live_at_step_ends": ev["live_at_step_ends"],
                "still_alive": ev.get("still_alive", [])[:3],
                "text": growth[0].message}
    also = (" (memory also grows across steps: fix that leak too)" if growth else "")
    before = [s for s in profile.steps if s.index < step]
    if not before:
        return {"cause": "step_too_big", "step": step, "first_step": True,
                "text": "the first step already did not fit" + also}
    prev = max(s.peak for s in before)
    start = int(profile.live_bytes()[before[-1].end - 1]) if before[-1].end > 0 else 0
    return {"cause": "step_too_big", "step": step, "first_step": False,
            "earlier_peak": int(prev), "live_at_step_start": start,
            "text": f"steps 0-{step - 1} fitted (peak {fmt_bytes(prev)}); step {step} started "
                    f"with {fmt_bytes(start)} alive and needed more; memory did not grow "
                    "across steps (what stays from the first step, e.g. optimizer state, "
                    "plus one step is too much)"}


def memory_state(oom: dict, alive: int, capacity: int | None, capacity_source: str) -> dict:
    """Allocated vs reserved vs capacity at the failing request, as the allocator reported
    them (`alive`: what memprof saw alive, blocks from before tracking included - or, for an
    OOM after the log filled, the allocator's own count, the one known then);
    fragmentation = the reserved bytes cached but free, as a share of reserved."""
    allocated, reserved = oom["total_allocated"], oom["total_reserved"]
    cached_free = max(0, reserved - allocated)
    state = {"allocated": allocated, "alive": alive, "reserved": reserved, "capacity": capacity,
             "capacity_source": capacity_source, "cached_free": cached_free,
             "fragmentation": cached_free / reserved if reserved else None,
             "request_fits_in_cache": bool(reserved and cached_free >= oom["requested"])}
    if not reserved:
        state["text"] = (f"{fmt_bytes(alive)} alive when {fmt_bytes(oom['requested'])} were "
                         "requested (this allocator keeps no cache: no fragmentation)")
    else:
        state["text"] = (f"{fmt_bytes(allocated)} allocated, {fmt_bytes(reserved)} reserved "
                         f"({fmt_bytes(cached_free)}, {state['fragmentation']:.0%}, cached but "
                         "free)" + (": the cache held more than the request, but no block "
                                    "large enough (fragmentation)"
                                    if state["request_fits_in_cache"] else ""))
    if capacity:
        state["text"] += f"; capacity {fmt_bytes(capacity)} ({capacity_source})"
    return state


def diagnose(profile: Profile, which: int = 0, capacity: int | None = None,
             capacity_source: str | None = None) -> dict | None:
    """The diagnosis of the profile's `which`-th out-of-memory report (None: there is none).
    capacity: the device's bytes (default: the CUDA device's total memory, or physical RAM)."""
    ooms = profile.oom_events
    if not ooms:
        return None
    oom = ooms[which]
    if capacity is None:
        capacity, capacity_source = device_capacity(profile)
    source = capacity_source or "given capacity"
    alive = alive_summary(profile, oom["position"] - 1)
    # after the log filled, the allocator's own count is the one known at the OOM, and what
    # the log holds alive is its end's
    past = bool(oom.get("dropped_before"))
    out = {"request": dict(oom), "ooms": len(ooms), "alive": alive,
           "memory": memory_state(oom, oom["total_allocated"] if past else alive["bytes"],
                                  capacity or None, source)}
    if past:
        out["alive"]["at_log_end"] = True
        out["memory"]["text"] += (f"; memprof's log holds {fmt_bytes(alive['bytes'])} alive "
                                  f"at its end (step {_log_end(profile, oom)[1]})")
    if past and not (capacity and oom["requested"] >= capacity):
        out["cause"] = past_the_log(profile, oom, capacity or None)
    else:   # (one request larger than the device needs no log to explain it)
        out["cause"] = classify(profile, oom["step"], oom["requested"], capacity or None,
                                source)
    return out


def _log_end(profile: Profile, oom: dict) -> tuple:
    """(the run's own memory events before the OOM, the step of the last one): where the log
    ended, for an OOM after it filled (the blocks from before the block are not the run's)."""
    mem = profile.memory[:oom["position"]]
    mem = mem[mem["thread"] >= 0]
    return mem, int(mem["step"][-1]) if mem.size else 0


def past_the_log(profile: Profile, oom: dict, capacity: int | None) -> dict:
    """The cause of an OOM that came after the event log filled: what the allocator's own
    counts say (they are in the OOM report), the growth of the recorded steps, and the
    capacity that would record up to the OOM (from the events a recorded step took)."""
    mem, end_step = _log_end(profile, oom)
    device = mem[(mem["device_type"] == oom["device_type"])
                 & (mem["device_index"] == oom["device_index"])]
    end_total = int(device["total_allocated"][-1]) if device.size else None
    # every memory event counts against the capacity (all devices: the side stream's too);
    # the steps before the log's end are whole, the one it ended in is not
    side = profile.run.streams.side
    side = side[(side["kind"] == KIND_MEMORY) & (side["thread"] >= 0)]
    whole = int(np.count_nonzero(mem["step"] < end_step)
                + np.count_nonzero(side["step"] < end_step))
    at_least = end_step == 0   # the log filled in the first step: it took more than was kept
    if end_step:
        per_step = -(-whole // end_step)
    else:
        per_step = max(int(mem.size + side.size), int(profile.meta.get("capacity") or 0), 1)
    need = per_step * (oom["step"] + 1)   # steps 0 .. the OOM's
    too_many = need > MAX_CAPACITY        # more than `memprof run --capacity` takes
    text = (f"the event log filled in step {end_step} (capacity "
            f"{int(profile.meta.get('capacity', 0)):,} events) and the OOM came in step "
            f"{oom['step']}" + (": what was allocated in between is not recorded"
                                if oom["step"] > end_step else ", after it filled"))
    grew = None
    if end_total is not None:
        grew = oom["total_allocated"] - end_total
        text += (f". The allocator's own count: {fmt_bytes(oom['total_allocated'])} allocated "
                 f"at the OOM against {fmt_bytes(end_total)} at the log's end")
        if oom["step"] > end_step:
            text += (f" ({'+' if grew >= 0 else '-'}{fmt_bytes(abs(grew))} over "
                     f"{oom['step'] - end_step} steps)")
    growth = memory_growth(profile, capacity=capacity)
    if growth:
        text += f"; the recorded steps already grow: {growth[0].message}"
    return {"cause": "past_the_log", "step": oom["step"], "log_end_step": end_step,
            "allocated_at_log_end": end_total, "grew_since": grew, "growing": bool(growth),
            "events_per_step": per_step, "events_per_step_at_least": at_least,
            "capacity_needed": need, "capacity_needed_bytes": need * EVENT_DTYPE.itemsize,
            "capacity_too_large": too_many, "text": text}


FIXES = {
    "growth": "fix what keeps memory alive across steps (the memory_growth and retained-graph "
              "findings name it); a smaller batch only delays the OOM",
    "step_too_big": "make the step smaller: a smaller micro-batch with gradient accumulation, "
                    "activation checkpointing (memprof.checkpoint.apply) or AMP; 'what would "
                    "fit' in the report has estimates",
    "single_request": "check the shape that this op allocates: no batch or precision change of "
                      "the rest of the step makes room for it",
}


def where(d: dict) -> str:
    """'step 3, backward, module blocks.0, op aten::mm, autograd node MmBackward0'."""
    return (f"step {d['step']}, {d['phase']}, module {d['module']}, op {d['op']}"
            + (f", autograd node {d['node']}" if d.get("node") else ""))


def out_of_memory(profile: Profile) -> list[Finding]:
    """The analysis: one finding for the first out-of-memory report of the run."""
    d = diagnose(profile)
    if d is None:
        return []
    req, cause = d["request"], d["cause"]
    if cause["cause"] == "past_the_log":
        least = "at least " if cause["events_per_step_at_least"] else ""
        took = (f"the recorded steps took {least}about {cause['events_per_step']:,} events "
                f"each, {fmt_bytes(cause['capacity_needed_bytes'])} of host memory for steps "
                f"0-{cause['step']}")
        if cause["capacity_too_large"]:
            fix = (f"{took}: more than one log holds ({MAX_CAPACITY:,} events); make the run "
                   "reach the OOM in fewer steps (a shorter schedule, the batch that fails from "
                   "the start) and record that")
        else:
            fix = (f"record up to the OOM: memprof run --capacity {cause['capacity_needed']} "
                   f"(track(capacity=...)): {took}")
        if cause["growing"]:
            fix = FIXES["growth"] + "; " + fix
    else:
        fix = FIXES[cause["cause"]]
    if d["memory"]["request_fits_in_cache"]:
        fix += "; fragmentation: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    return [Finding(
        kind="out_of_memory", severity="error", bytes=req["requested"],
        message=(f"out of memory on {req['device']} at {where(req)}: tried to allocate "
                 f"{fmt_bytes(req['requested'])}; {d['memory']['text']}. Cause: "
                 f"{cause['text']}"),
        fix=fix, evidence=d)]
