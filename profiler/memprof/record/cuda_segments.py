"""CUDA allocator segments recorder: on a CUDA run, the real caching allocator's segments, so
the memory-snapshot export (report/snapshot.py) shows the segments and blocks the GPU really
had instead of memprof's allocator model.

What it keeps, as plain data (`run.records["cuda_segments"]`):
- `segments`: torch.cuda.memory._snapshot()'s segments of the device when the block ends,
  each with its blocks (address, size, requested size, state; no stack frames: memprof names
  blocks itself, from its own events at the same addresses);
- `actions`: the allocator's segment actions during the block (segment_alloc / segment_free /
  segment_map / segment_unmap with address, size, stream and time), from its history,
  recorded with allocations, frees and stack traces skipped (cheap). If the user's code
  already records the history, it is left as it was and read, not restarted;
- `clock`: the host's Unix and monotonic clocks read together, to place the allocator's Unix
  times among memprof's monotonic event times.
Nothing is recorded on a CPU run, or when CUDA was not initialised when the block began
(memprof does not start a CUDA context for a run that does not use one).
"""
from __future__ import annotations

import sys
import time

import torch

SEGMENT_ACTIONS = ("segment_alloc", "segment_free", "segment_map", "segment_unmap")
SKIPPED = ["alloc", "free_requested", "free_completed", "snapshot"]
MAX_ACTIONS = 1_000_000     # allocator history entries kept (segment actions only)


class CudaSegmentsRecorder:
    name = "cuda_segments"

    def __init__(self):
        self.device: int | None = None
        self.started_history = False
        self.clock: dict | None = None
        self.data: dict | None = None
        self.error: str | None = None

    def install(self, session) -> None:
        self.device = _cuda_device(session)
        if self.device is None:
            return
        self.clock = {"unix_ns": time.time_ns(), "monotonic_ns": time.monotonic_ns()}
        try:
            before = torch.cuda.memory._snapshot(self.device)
            if not any(before.get("device_traces") or []):   # nobody records history yet
                torch.cuda.memory._record_memory_history(
                    "all", context=None, stacks="python", max_entries=MAX_ACTIONS,
                    device=self.device, skip_actions=SKIPPED)
                self.started_history = True
        except Exception as err:  # noqa: BLE001  (segments are extra: never break training)
            self.error = f"{type(err).__name__}: {err}"

    def remove(self) -> None:
        if self.device is None or self.data is not None:
            return
        try:
            snap = torch.cuda.memory._snapshot(self.device)
        except Exception as err:  # noqa: BLE001
            self.error = self.error or f"{type(err).__name__}: {err}"
            snap = None
        finally:
            if self.started_history:
                torch.cuda.memory._record_memory_history(None, device=self.device)
                self.started_history = False
        if snap is not None:   # a history the user started also holds what came before us
            self.data = plain_snapshot(snap, self.device, self.clock,
                                       self.clock["unix_ns"] // 1000)

    def record(self):
        if self.device is None:
            return None
        out = dict(self.data or {"device": self.device, "segments": [], "actions": []})
        if self.error:
            out["error"] = self.error
        return out


def plain_snapshot(snap: dict, device: int, clock: dict | None,
                   since_us: int | None = None) -> dict:
    """The device's segments (blocks without frames) and its segment actions (from Unix
    time `since_us` on, if given), as JSON-able data."""
    segments = []
    for s in snap.get("segments", []):
        if int(s.get("device", device)) != device:
            continue
        segments.append({
            "address": int(s["address"]), "total_size": int(s["total_size"]),
            "stream": int(s.get("stream", 0)), "segment_type": str(s.get("segment_type", "large")),
            "segment_pool_id": [int(x) for x in s.get("segment_pool_id", (0, 0))],
            "is_expandable": bool(s.get("is_expandable", False)),
            "blocks": [{"address": int(b["address"]), "size": int(b["size"]),
                        "requested_size": int(b.get("requested_size", 0)),
                        "state": str(b["state"])} for b in s.get("blocks", [])]})
    traces = snap.get("device_traces") or []
    since_us = since_us or 0
    actions = [{"action": e["action"], "addr": int(e["addr"]), "size": int(e["size"]),
                "stream": int(e.get("stream", 0)), "time_us": int(e.get("time_us", 0))}
               for e in (traces[device] if device < len(traces) else [])
               if e.get("action") in SEGMENT_ACTIONS and int(e.get("time_us", 0)) >= since_us]
    return {"device": device, "segments": segments, "actions": actions, "clock": clock,
            "source": "torch.cuda.memory._snapshot (torch " + torch.__version__ + ")"}


def _cuda_device(session) -> int | None:
    """The CUDA device the run uses: its model's, else the current one; None on a CPU run
    or before CUDA was initialised."""
    if "torch.cuda" not in sys.modules or not torch.cuda.is_available():
        return None
    for model in session.scope.root_modules():
        for p in model.parameters():
            if p.is_cuda:
                return int(p.device.index or 0)
    if torch.cuda.is_initialized():
        return int(torch.cuda.current_device())
    return None
