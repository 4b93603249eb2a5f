"""A budget without the GPU: would this recorded run have fitted on a given GPU, and if not,
where would it have run out?

    result = replay(profile, "v100-16gb")          # or a byte count
    result.fits, result.headroom, result.failure, result.projection

The profile's allocation stream (recorded on any device) is replayed through the caching-
allocator model (`memprof.plan.allocator.simulate`) with the GPU's usable bytes as its
capacity (`memprof.plan.gpus.usable_bytes`: total memory - CUDA context - margin; a byte
budget is used as it is). The result says:

* whether the run fits, its peak reserved bytes and where that peak is, and the headroom;
* where it would have failed: the first request that does not fit even after the allocator
  released its cache (a run that did run out of memory asks for its failing request again) (memory position, step, phase, module, op, autograd node), what was alive
  then, and why (`memprof.analyse.oom.classify`: growth across steps, a step too big, or one
  request larger than the GPU); for a step too big, `memprof.plan.fit.what_fits` says what
  would fit instead;
* for a run that fits but grows step after step (a leak): the step at which it would run out,
  found by replaying synthesized later steps (the recorded state, plus the leaked blocks of one
  step repeated, plus one recorded step) through the same allocator model;
* the precision the run computed in (its autocast dtype, or its weights' when they are half
  precision: `memprof.plan.precision.run_precision`) and whether the GPU runs it: bf16 on a
  V100 or T4 does not, and the result says what would run there instead.

Every replayed number is an estimate of what the GPU's allocator would do with this stream.
Not modelled: tensors a CPU-recorded run keeps on the host (input batches before .to(device))
are counted as if they were on the GPU; cuBLAS/cuDNN workspaces and kernels' internal buffers
are not in a CPU stream (the margin of `usable_bytes` stands for them).
"""
from __future__ import annotations

import bisect
import dataclasses
import math

import numpy as np

from ..analyse.growth import memory_growth
from ..analyse.oom import alive_summary, classify
from ..profile import Profile
from ..record.events import CAT_GRADIENTS, CAT_OPTIMIZER_STATE, CAT_PARAMETERS
from ..units import fmt_bytes
from .allocator import new_segment_bytes, simulate
from .gpus import DEFAULT_OVERHEAD_BYTES, FIT_MARGIN, GPU, lookup, usable_bytes
from .precision import run_precision, unsupported
from .streams import step_stream

MAX_SYNTH_EVENTS = 8_000_000   # a projection replaying more events is linear only (memory)
NOTES = ("replayed through memprof's model of the CUDA caching allocator: an estimate",
         "host-side tensors of a CPU-recorded run count as if they were on the GPU; cuBLAS / "
         "cuDNN workspaces are not in the stream (the margin stands for them)")


@dataclasses.dataclass
class BudgetResult:
    """What the replay found; byte counts are what the modelled allocator would hold."""
    budget: str                 # the GPU's table name, or the byte budget in words
    capacity: int               # bytes the allocator may reserve
    total_memory: int | None    # the GPU's total memory (None for a byte budget)
    fits: bool
    peak_reserved: int          # of the part replayed (up to the failure, if any)
    peak_allocated: int
    headroom: int               # capacity - peak_reserved
    fragmentation_at_peak: float
    peak: dict | None           # where reserved peaked (Profile.describe_event)
    failure: dict | None = None
    projection: dict | None = None
    per_step: list = dataclasses.field(default_factory=list)
    precision: dict | None = None   # the run's precision; "supported": False on a GPU without it
    notes: tuple = NOTES
    estimated: bool = True

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def summary(self) -> str:
        """One line: fits with headroom, where it fails, or when it would."""
        if self.failure:
            f = self.failure
            return (f"does not fit {self.budget}: out of memory at step {f['where']['step']} "
                    f"({f['where']['phase']}, module {f['where']['module']}, op "
                    f"{f['where']['op']}), requesting {fmt_bytes(f['request'])} with "
                    f"{fmt_bytes(f['reserved'])} of {fmt_bytes(self.capacity)} reserved"
                    f"{segment_clause(f, self.capacity)}")
        line = (f"fits {self.budget}: peak {fmt_bytes(self.peak_reserved)} reserved of "
                f"{fmt_bytes(self.capacity)} usable, headroom {fmt_bytes(self.headroom)}")
        if self.projection and self.projection.get("step") is not None:
            line += (f"; but memory grows: out of memory at step ~{self.projection['step']} "
                     f"({self.projection['method']})")
        if self.precision and not self.precision["supported"]:
            line += f"; but {self.precision['text']}"
        return line


def capacity_of(budget) -> tuple[int, str, int | None]:
    """(usable bytes, label, total memory or None) of a GPU name / GPU / byte count."""
    if isinstance(budget, bool) or budget is None:
        raise ValueError(f"budget: expected a GPU name (e.g. v100-16gb) or a number of bytes, "
                         f"got {budget!r}")
    if isinstance(budget, (int, np.integer)):
        if budget <= 0:
            raise ValueError(f"budget: expected a positive number of bytes, got {budget}")
        return int(budget), f"a budget of {fmt_bytes(int(budget))}", None
    if isinstance(budget, (str, GPU)):
        g = lookup(budget)   # ValueError naming the known GPUs
        usable = usable_bytes(g)
        if usable <= 0:
            raise ValueError(f"nothing is left to PyTorch's allocator on {g.name} after the "
                             f"CUDA context ({fmt_bytes(DEFAULT_OVERHEAD_BYTES)}) and the "
                             f"{FIT_MARGIN:.0%} margin; give a larger GPU or a number of bytes")
        return usable, g.name, g.memory_bytes
    raise ValueError(f"budget: expected a GPU name (e.g. v100-16gb) or a number of bytes, got "
                     f"{type(budget).__name__}")


def precision_check(profile: Profile, budget) -> dict | None:
    """The precision the run computed in and whether the budget's GPU runs it (None for a
    byte budget: no GPU to ask)."""
    if not isinstance(budget, (str, GPU)):
        return None
    gpu = lookup(budget)
    precision, source = run_precision(profile.run.records.get("inputs"))
    out = {"run": precision, "source": source, "supported": gpu.supports(precision),
           "text": None}
    if not out["supported"]:
        what = "its weights are" if source == "weights" else "autocast in"
        instead = ("with its weights converted (the same bytes)" if source == "weights" else
                   "under autocast with GradScaler (about the same bytes)")
        # (weights half as built: fp32 would be another model, which the fit does not plan)
        fp32 = "" if source == "weights" else " or in fp32 (more memory)"
        out["text"] = (f"the run computes in {precision} ({what} {precision}) and "
                       f"{unsupported(gpu, precision)}: there it would train in fp16 {instead}"
                       f"{fp32}, not as recorded")
    return out


def _per_step(profile: Profile, reserved: np.ndarray, allocated: np.ndarray) -> list[dict]:
    out = []
    for s in profile.steps:
        end = min(s.end, reserved.size)
        if end <= s.start:
            break
        out.append({"step": s.index, "peak_reserved": int(reserved[s.start:end].max()),
                    "peak_allocated": int(allocated[s.start:end].max())})
    return out


def stream_with_oom(profile: Profile):
    """(ptr, size, at): the profile's stream (step_stream 'first') with the request of its
    first out-of-memory report put back at its place `at` (None: the run had none). The run
    stopped there, so a replay must ask for it too."""
    ptr, size = step_stream(profile, "first")
    # (an OOM after the event log filled has no place in the recorded stream: its position is
    # the log's end, steps earlier)
    if not profile.oom_events or profile.oom_events[0].get("dropped_before"):
        return ptr, size, None
    oom = profile.oom_events[0]
    at = oom["position"]
    return (np.insert(ptr, at, np.uint64(ptr.size + 1)),
            np.insert(size, at, np.int64(oom["requested"])), at)


def _where(profile: Profile, index: int, at: int | None) -> tuple[dict, int]:
    """(description, memory position) of stream row `index` (the re-inserted OOM request at
    row `at` is described by its report)."""
    if at is not None and index == at:
        oom = profile.oom_events[0]
        where = {k: oom[k] for k in ("step", "phase", "module", "op", "node", "time_s")}
        return dict(where, index=at, size=oom["requested"]), at
    pos = index - (1 if at is not None and index > at else 0)
    return profile.describe_event(pos), pos


def replay(profile: Profile, budget, *, project: bool = True) -> BudgetResult:
    """Replay `profile` against `budget` (a GPU name such as 'v100-16gb', a memprof.plan.gpus
    GPU, or a byte count); see the module docstring."""
    capacity, label, total = capacity_of(budget)
    ptr, size, at = stream_with_oom(profile)
    sim = simulate((ptr, size), capacity=capacity)
    peak_pos = sim.peak_reserved_event
    reserved, allocated = sim.reserved, sim.allocated
    if at is not None and reserved.size > at:   # timelines by memory position
        reserved, allocated = np.delete(reserved, at), np.delete(allocated, at)
    result = BudgetResult(
        budget=label, capacity=capacity, total_memory=total, fits=not sim.oom,
        peak_reserved=sim.peak_reserved, peak_allocated=sim.peak_allocated,
        headroom=capacity - sim.peak_reserved,
        fragmentation_at_peak=float(sim.fragmentation_at_peak),
        peak=_where(profile, peak_pos, at)[0] if peak_pos >= 0 else None,
        per_step=_per_step(profile, reserved, allocated),
        precision=precision_check(profile, budget))
    if sim.oom:
        result.failure = _failure(profile, sim, capacity, label, at)
    elif project:
        result.projection = project_failure(profile, capacity)
    return result


def segment_clause(failure: dict, capacity: int) -> str:
    """Why a request smaller than what looks free does not fit: no cached block holds it, and
    the segment the allocator would reserve for it is larger than what is left ("requesting
    1.06 MiB with 6.00 MiB of 7.50 MiB reserved" read as a paradox)."""
    segment = failure.get("segment")
    most_left = capacity - failure["allocated"]   # were every free cached byte released
    if not segment or segment <= failure["request"] or segment <= most_left:
        return ""
    return (f": no cached block holds it, and the new {fmt_bytes(segment)} segment the "
            f"caching allocator reserves for a request of that size is more than the at "
            f"most {fmt_bytes(max(0, most_left))} left with its free cached blocks released")


def _failure(profile: Profile, sim, capacity: int, label: str, at: int | None) -> dict:
    """Where the replay ran out, what was alive, and why."""
    index = int(sim.oom_event)
    where, pos = _where(profile, index, at)
    return {
        "position": pos, "where": where, "request": int(sim.oom_bytes),
        "allocated": int(sim.allocated[index - 1]) if index > 0 else 0,
        "reserved": int(sim.reserved[index - 1]) if index > 0 else 0,
        "segment": new_segment_bytes(int(sim.oom_bytes), sim.expandable_segments),
        "alive": alive_summary(profile, pos - 1),
        "cause": classify(profile, where["step"], int(sim.oom_bytes), capacity, label)}


# ------------------------------------------------------------------ projection of a leak
def leak_template(profile: Profile) -> tuple[object, np.ndarray] | None:
    """(template step, positions of the allocations it leaked): the second-to-last complete
    step and what it allocated that is still alive at the end of the run (parameters,
    gradients and optimizer state excepted); None with fewer than 3 complete steps."""
    complete = profile.steps[:len(profile.marker_positions("step"))]
    if len(complete) < 3:
        return None
    t = complete[-2]
    mem = profile.memory
    idx = np.arange(t.start, t.end)
    leak = idx[(mem["size"][idx] > 0) & (profile.free_of[idx] < 0)
               & ~np.isin(profile.category[idx],
                          [CAT_PARAMETERS, CAT_GRADIENTS, CAT_OPTIMIZER_STATE])]
    return t, leak


def synthesized(stream, template, leak: np.ndarray, extra: int):
    """(ptr, size) of step template.index + extra, from the profile's `stream` (step_stream):
    the stream up to the template step, `extra` more steps' leaked blocks (fresh ids), then
    the template step's own events."""
    ptr, size = stream
    copies = np.arange(extra * leak.size, dtype=np.uint64) + np.uint64(ptr.size + 1)
    return (np.concatenate([ptr[:template.start], copies, ptr[template.start:template.end]]),
            np.concatenate([size[:template.start], np.tile(size[leak], extra),
                            size[template.start:template.end]]))


def project_failure(profile: Profile, capacity: int) -> dict | None:
    """For a run that grows across steps: the first step whose synthesized replay runs out of
    `capacity` (None: memory does not grow)."""
    if not memory_growth(profile, capacity=capacity):
        return None
    found = leak_template(profile)
    if found is None or found[1].size == 0:
        return None
    template, leak = found
    leak_bytes = int(profile.memory["size"][leak].sum())
    out = {"template_step": template.index, "leak_bytes_per_step": leak_bytes,
           "leak_blocks_per_step": int(leak.size), "step": None, "replays": 0}

    stream = step_stream(profile, "first")

    def fails(extra: int) -> bool:
        out["replays"] += 1
        return simulate(synthesized(stream, template, leak, extra), capacity=capacity,
                        return_timeline=False).oom

    def peak(extra: int) -> int:
        return simulate(synthesized(stream, template, leak, extra),
                        return_timeline=False).peak_reserved

    base = peak(0)
    guess = max(1, math.ceil((capacity - base) / leak_bytes))
    if guess * leak.size > MAX_SYNTH_EVENTS:
        out.update(step=template.index + guess, method="linear projection of the leak")
        return out
    # reserved growth per step, replayed (never below the leaked bytes: they stay allocated)
    slope = max(float(leak_bytes), (peak(guess) - base) / guess)
    out["reserved_growth_per_step"] = slope
    extra = _first_failing(fails, max(1, math.ceil((capacity - base) / slope)),
                           MAX_SYNTH_EVENTS // max(1, leak.size))
    if extra is None:
        out.update(step=template.index + guess, method="linear projection of the leak")
    else:
        out.update(step=template.index + extra, method="replay of synthesized steps")
    return out


def _first_failing(fails, guess: int, limit: int) -> int | None:
    """Smallest e >= 1 with fails(e) (monotone; fails(0) is False), searched outwards from
    `guess` in doubling strides, then bisected; None when the search would pass `limit`."""
    e = min(guess, limit)
    stride = max(1, e // 64)
    if fails(e):
        hi, lo = e, e - stride
        while lo > 0 and fails(lo):
            hi, stride = lo, stride * 2
            lo = hi - stride
        lo = max(lo, 0)
    else:
        lo = e
        while True:
            hi = lo + stride
            if hi > limit:
                return None
            if fails(hi):
                break
            lo, stride = hi, stride * 2
    # fails(lo) is False, fails(hi) is True: the first failing e in (lo, hi]
    return lo + 1 + bisect.bisect_left(range(lo + 1, hi), True, key=fails)
