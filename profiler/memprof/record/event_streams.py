"""The recorded events as two time-ordered arrays instead of one: the memory events of the
analysed device, which the Profile reads in place (its `memory` is this array, not a copy), and
every other record (markers, out-of-memory reports, other devices' memory events) with the
number of memory events before each. Keeping them apart is what lets leaving a block hold the
event bytes once; the single interleaved stream is rebuilt only when asked for.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .events import DEVICE_CPU, DEVICE_CUDA, EVENT_DTYPE, KIND_MEMORY


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
