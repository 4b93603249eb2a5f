"""Predict what PyTorch's CUDA caching allocator would reserve for a recorded allocation stream.

``simulate()`` replays (ptr, size) events through a native model of the allocator in
``c10/cuda/CUDACachingAllocator.cpp`` (see ``csrc/allocator_sim.cpp`` for the rules and what is
left out): 512 B rounding, small (<= 1 MiB, 2 MiB segments) and large pools (20 MiB segments
below 10 MiB, else rounded up to 2 MiB), best-fit by (size, address), block splitting and
coalescing, ``max_split_size``, ``expandable_segments`` and a capacity limit with the
allocator's release-cache-and-retry before an out-of-memory error.

Sizes in the input are the bytes the program asked for (a stream recorded on a GPU reports the
allocator's block sizes instead: already rounded, so replaying it is close but can count an
unsplit remainder twice); "allocated" in the result is what
``torch.cuda.memory_allocated()`` would report (rounded block sizes) and "reserved" what
``torch.cuda.memory_reserved()`` would report. The CUDA context and library workspaces that
live outside the allocator are not part of it (see ``memprof.plan.gpus.usable_bytes``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..record.events import KIND_MEMORY

MIB = 1 << 20
#: the smallest max_split_size the real allocator accepts (max_split_size_mb >= 20)
MIN_MAX_SPLIT_SIZE = 20 * MIB


def new_segment_bytes(request: int, expandable_segments: bool = False) -> int:
    """The segment the caching allocator reserves for a request no cached block fits (the
    rules of csrc/allocator_sim.cpp): 2 MiB for requests up to 1 MiB, 20 MiB below 10 MiB,
    else the request rounded up to 2 MiB (expandable segments: mapped in 2 MiB pages)."""
    size = max(512, -(-int(request) // 512) * 512)
    if expandable_segments or size >= 10 * MIB:
        return -(-size // (2 * MIB)) * (2 * MIB)
    return 2 * MIB if size <= MIB else 20 * MIB


@dataclasses.dataclass(frozen=True)
class SimResult:
    """Summary of one replay. Byte counts are ints; event indices refer to input rows."""

    peak_allocated: int           #: max of memory_allocated() (rounded block bytes)
    peak_requested: int           #: max of the bytes requested (unrounded)
    peak_reserved: int            #: max of memory_reserved()
    peak_reserved_event: int      #: first event at which reserved reached its peak (-1: none)
    allocated_at_peak_reserved: int
    fragmentation_at_peak: float  #: 1 - allocated / reserved at peak_reserved_event
    segments_at_peak: int         #: live segments at peak_reserved_event
    max_segments: int             #: most live segments at any time
    allocated_end: int
    reserved_end: int
    segments_end: int
    num_device_alloc: int         #: cudaMalloc calls (expandable segments: page-map calls)
    num_device_free: int          #: cudaFree calls (expandable segments: page-unmap calls)
    num_alloc_retries: int        #: cache flushes (release of unused segments) before a retry
    oom: bool                     #: an allocation did not fit into capacity; replay stopped
    oom_event: Optional[int]      #: input row of that allocation
    oom_bytes: Optional[int]      #: bytes it requested
    num_events: int
    events_replayed: int          #: num_events, or oom_event + 1 after an OOM
    num_allocs: int
    num_frees: int
    unknown_frees: int            #: frees of a ptr that was not live (ignored)
    duplicate_allocs: int         #: allocations of a ptr still live (previous one freed first)
    zero_size_events: int         #: rows ignored (size 0, masked, or not a memory event)
    expandable_segments: bool
    capacity: Optional[int]
    max_split_size: Optional[int]
    #: reserved / allocated bytes after each replayed event (None if return_timeline=False)
    reserved: Optional[np.ndarray] = dataclasses.field(default=None, repr=False, compare=False)
    allocated: Optional[np.ndarray] = dataclasses.field(default=None, repr=False, compare=False)
    #: where the model put things (None unless return_layout=True): 'block_addr' / 'block_size'
    #: per input row (0 where the row is not a placed allocation) and 'segments', parallel
    #: arrays event / addr / size / action (SEGMENT_ACTIONS) / small of every segment operation
    layout: Optional[dict] = dataclasses.field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        """The summary without the timelines (JSON-friendly)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("reserved", "allocated", "layout")}


EventsLike = Union[np.ndarray, Sequence[Any]]
#: layout["segments"]["action"] codes, as PyTorch's memory snapshot names them
SEGMENT_ACTIONS = {1: "segment_alloc", 2: "segment_free", 3: "segment_map", 4: "segment_unmap"}


def _int_array(a: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(a)
    except Exception as e:  # noqa: BLE001 - report any conversion failure in one line
        raise TypeError(f"simulate: {name} could not be read as an array ({e})") from None
    if arr.ndim != 1:
        raise ValueError(f"simulate: {name} must be a 1-D array, got shape {arr.shape}")
    if arr.dtype.kind not in "iu" or arr.dtype.names is not None:
        raise TypeError(f"simulate: {name} must be an integer array, got dtype {arr.dtype}")
    return arr


def _split_input(events_or_arrays: EventsLike):
    if isinstance(events_or_arrays, np.ndarray) and events_or_arrays.dtype.names is not None:
        ev = events_or_arrays
        missing = [f for f in ("ptr", "size") if f not in ev.dtype.names]
        if missing:
            raise ValueError("simulate: structured array needs fields 'ptr' and 'size', "
                             f"missing {missing} (has {list(ev.dtype.names)})")
        if ev.ndim != 1:
            raise ValueError(f"simulate: event array must be 1-D, got shape {ev.shape}")
        kind = ev["kind"] if "kind" in ev.dtype.names else None
        return ev["ptr"], ev["size"], kind
    if isinstance(events_or_arrays, (tuple, list)) and len(events_or_arrays) == 2:
        return events_or_arrays[0], events_or_arrays[1], None
    raise TypeError("simulate: expected a structured event array with fields 'ptr' and 'size' "
                    f"or a (ptr, size) pair of arrays, got {type(events_or_arrays).__name__}")


def _opt_bytes(v: Any, name: str, minimum: int = 1) -> int:
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"simulate: {name} must be an int number of bytes or None, "
                        f"got {type(v).__name__}")
    if int(v) < minimum:
        raise ValueError(f"simulate: {name} must be >= {minimum} bytes or None, got {int(v)}")
    return int(v)


def simulate(events_or_arrays: EventsLike, *, expandable_segments: bool = False,
             capacity: Optional[int] = None, max_split_size: Optional[int] = None,
             mask: Optional[np.ndarray] = None, return_timeline: bool = True,
             return_layout: bool = False) -> SimResult:
    """Replay allocation events through the CUDA caching-allocator model.

    events_or_arrays: a numpy structured array with fields ``ptr`` (uint64) and ``size``
        (int64, +bytes allocated / -bytes freed), such as memprof's event log, or a
        ``(ptr, size)`` pair of 1-D integer arrays. Rows of a structured array whose ``kind``
        field is not a memory event (marks, OOM reports) are ignored.
    expandable_segments: model ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``.
    capacity: bytes the allocator may reserve (e.g. ``memprof.plan.gpus.usable_bytes(gpu)``);
        None = unlimited. The replay stops at the first allocation that does not fit even
        after the cache is released (``oom=True``).
    max_split_size: ``max_split_size_mb`` in bytes (>= 20 MiB, as the real setting);
        None = unlimited (the default of PyTorch).
    mask: optional boolean array, one per row; rows where it is False are ignored.
    return_timeline: also return reserved/allocated after each event (2 x 8 bytes per event).
    return_layout: also return where each block and segment went (SimResult.layout), for a
        memory snapshot of the replay (another 16 bytes per event).
    """
    ptr, size, kind = _split_input(events_or_arrays)
    ptr = _int_array(ptr, "ptr")
    size = _int_array(size, "size")
    if size.dtype.kind != "i":
        raise TypeError(f"simulate: size must be a signed integer array (negative = free), "
                        f"got dtype {size.dtype}")
    if ptr.shape != size.shape:
        raise ValueError(f"simulate: ptr and size must have the same length, "
                         f"got {ptr.shape[0]} and {size.shape[0]}")
    if ptr.dtype.itemsize == 8 and ptr.dtype.kind == "i":
        ptr = ptr.view(np.uint64)  # identities only: reinterpret, no copy
    cap = _opt_bytes(capacity, "capacity")
    mss = _opt_bytes(max_split_size, "max_split_size", MIN_MAX_SPLIT_SIZE)

    ignore = None
    if kind is not None:
        other = kind != KIND_MEMORY
        ignore = other if other.any() else None
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != np.bool_ or m.shape != size.shape:
            raise ValueError(f"simulate: mask must be a boolean array of shape {size.shape}, "
                             f"got dtype {m.dtype} shape {m.shape}")
        ignore = ~m if ignore is None else (ignore | ~m)
    if ignore is not None:
        size = np.where(ignore, 0, size).astype(np.int64, copy=False)

    from memprof import _C  # lazy: loads torch's libraries first via memprof/__init__

    d = _C.simulate_allocator(ptr, size, expandable_segments=bool(expandable_segments),
                              capacity=cap, max_split_size=mss,
                              return_timeline=bool(return_timeline),
                              return_layout=bool(return_layout))
    d["oom"] = bool(d["oom"])
    if not d["oom"]:
        d["oom_event"] = d["oom_bytes"] = None
    return SimResult(**d, expandable_segments=bool(expandable_segments), capacity=cap or None,
                     max_split_size=mss or None)
