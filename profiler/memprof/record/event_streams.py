"""The recorded events as two time-ordered arrays instead of one: the memory events of the
analysed device, which the Profile reads in place (its `memory` is this array, not a copy), and
every other record (markers, out-of-memory reports, other devices' memory events) with the
number of memory events before each. Keeping them apart is what lets leaving a block hold the
event bytes once; the single interleaved stream is rebuilt only when asked for.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .events import DEVICE_CPU, DEVICE_CUDA, EVENT_DTYPE, KIND_MEMORY, PREEXISTING_THREAD


@dataclass
class EventStreams:
    memory: np.ndarray          # EVENT_DTYPE: allocations and frees of `device_type`, in order
    side: np.ndarray            # EVENT_DTYPE: every other record, in order
    side_position: np.ndarray   # int64 per side record: memory events before it
    device_type: int            # the analysed device: CUDA when any CUDA memory was recorded

    def __post_init__(self):
        for name in ("memory", "side"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.dtype != EVENT_DTYPE or arr.ndim != 1:
                raise TypeError(f"{name}: expected a 1-d array of dtype EVENT_DTYPE, got "
                                f"{getattr(arr, 'dtype', type(arr).__name__)}")
        if self.side_position.shape != self.side.shape:
            raise ValueError(f"side_position: expected one entry per side record "
                             f"({self.side.size}), got {self.side_position.size}")

    @classmethod
    def split(cls, events: np.ndarray) -> "EventStreams":
        """The two streams of one interleaved, time-ordered event array (a copy of each part)."""
        if not isinstance(events, np.ndarray) or events.dtype != EVENT_DTYPE:
            raise TypeError(f"events: expected an array of dtype EVENT_DTYPE, got "
                            f"{getattr(events, 'dtype', type(events).__name__)}")
        events = events.reshape(-1)
        is_memory = events["kind"] == KIND_MEMORY
        device = (DEVICE_CUDA if (is_memory & (events["device_type"] == DEVICE_CUDA)).any()
                  else DEVICE_CPU)
        is_memory &= events["device_type"] == device
        before = np.cumsum(is_memory, dtype=np.int64) - is_memory
        return cls(memory=events[is_memory], side=events[~is_memory],
                   side_position=before[~is_memory], device_type=int(device))

    @property
    def size(self) -> int:
        return int(self.memory.size + self.side.size)

    def side_index(self) -> np.ndarray:
        """Index of each side record in the interleaved stream."""
        return self.side_position + np.arange(self.side.size, dtype=np.int64)

    def merged(self) -> np.ndarray:
        """The single interleaved, time-ordered stream (a new array: both parts copied)."""
        out = np.empty(self.size, dtype=EVENT_DTYPE)
        is_side = np.zeros(self.size, dtype=bool)
        is_side[self.side_index()] = True
        out[is_side] = self.side
        out[~is_side] = self.memory
        return out


# ------------------------------------------------------------------ blocks from before
def behind_baseline(raw: np.ndarray, order: np.ndarray, base: list) -> np.ndarray:
    """raw[order] (the threads' logs put in time order) behind one row per block of `base`,
    placed in one array (np.take's mode "raise" would buffer a second whole copy first;
    argsort's indices are all in range)."""
    events = np.empty(len(base) + order.size, dtype=EVENT_DTYPE)
    np.take(raw, order, out=events[len(base):], mode="clip")
    first = int(events["t_ns"][len(base)]) if order.size else 0
    events[:len(base)] = baseline_rows(base, first)
    return events


def baseline_rows(base: list, t_ns: int) -> np.ndarray:
    """One synthetic allocation per block that existed before tracking (thread -1), at the
    time of the first recorded event."""
    rows = np.zeros(len(base), dtype=EVENT_DTYPE)
    if base:
        arr = np.array([b[:4] for b in base], dtype=np.int64)
        rows["ptr"] = arr[:, 0].astype(np.uint64)
        rows["size"] = arr[:, 1]
        rows["device_type"] = arr[:, 2]
        rows["module"] = arr[:, 3]
        rows["t_ns"] = t_ns
        for f in ("op", "node", "seq"):
            rows[f] = -1
        rows["thread"] = PREEXISTING_THREAD
        rows["kind"] = KIND_MEMORY
    return rows


def fill_baseline(streams: EventStreams, base: list) -> None:
    """Writes the pre-existing blocks into the zeroed rows take_events left in front of each
    stream (the analysed device's in `memory`, the others in `side`, in baseline order)."""
    if not base:
        return
    on_device = np.array([int(b[2]) == streams.device_type for b in base], dtype=bool)
    k, m = int(on_device.sum()), int((~on_device).sum())
    first = [a["t_ns"][n] for a, n in ((streams.memory, k), (streams.side, m)) if a.size > n]
    rows = baseline_rows(base, int(min(first)) if first else 0)
    streams.memory[:k] = rows[on_device]
    streams.side[:m] = rows[~on_device]
