"""A Profile as a PyTorch memory snapshot (the layout of torch.cuda.memory._snapshot()), for
pytorch.org/memory_viz and torch.cuda._memory_viz.

On a CUDA run that recorded them (record/cuda_segments.py), segments, their blocks and the
segment actions are the real caching allocator's, at the real addresses
(report/snapshot_segments.py). Otherwise (CPU runs, estimates) segments and block addresses
come from replaying the profile through memprof's model of the CUDA caching allocator
(memprof.plan.allocator.simulate; csrc/allocator_sim.cpp). Either way every view of the
viewer works - the Active
Memory Timeline (allocations in requested bytes, coloured by memprof's category), the
Allocator State History (segment_alloc / segment_free and every block inside a live segment
at every event) and the segment flame graphs. The model's addresses are not the process's;
on a real GPU its reserved bytes can differ from the model's by what it leaves out (streams,
CUDA graphs, ...). Frames name the op, the module path (innermost first, each ancestor a
frame) and, outermost, the device and category ("cpu:0:activations"): the viewer numbers
devices and cannot name them, so CPU memory says so in every stack and in the top-level
"memprof" entry.
"""
from __future__ import annotations

import numpy as np

from ..plan.allocator import SEGMENT_ACTIONS, simulate
from ..profile import Profile
from ..record.events import CATEGORIES, DEVICE_CUDA, PHASES
from .snapshot_segments import SOURCE as REAL_SOURCE
from .snapshot_segments import real_layout, real_segments, recorded_segments

MAX_TRACE_ENTRIES = 200_000   # like the allocator's max_entries: the most recent are kept
SOURCE = ("memprof's model of the CUDA caching allocator (csrc/allocator_sim.cpp): "
          "segments and addresses are the model's")


class _Frames:
    """Frame lists, one shared object per (module, op, node, phase, step, category), so the
    pickle stores each distinct stack once."""

    def __init__(self, profile: Profile, device: str):
        self.p, self.device, self.cache = profile, device, {}
        mem = profile.memory
        self.cols = (profile.event_module, mem["op"], mem["node"], mem["phase"], mem["step"],
                     profile.category)

    def __call__(self, i: int) -> list[dict]:
        key = tuple(int(c[i]) for c in self.cols)
        got = self.cache.get(key)
        if got is None:
            got = self.cache[key] = self._build(*key)
        return got

    def _build(self, module, op, node, phase, step, cat) -> list[dict]:
        p = self.p
        name = p.strings[op] if 0 <= op < len(p.strings) else "<no op>"
        if 0 <= node < len(p.strings) and p.strings[node]:
            name = f"{name} (backward of {p.strings[node]})"
        path = p.module_name(module)
        phase_name = PHASES[phase] if 0 <= phase < len(PHASES) else "other"
        frames = [{"filename": path, "line": step, "name": name}]
        parts = path.split(".")
        ancestors = [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)]
        qualified = p.modules[module] if 0 <= module < len(p.modules) else ""
        if qualified and "" in p.modules:
            # a bare container's child reads 'Sequential.0' (Profile.module_name): its first
            # part is the model, framed below once, not an ancestor module as well
            if qualified[:1].isdigit():
                ancestors.pop()
            ancestors.append(p.module_name(p.modules.index("")))     # the model itself
        frames += [{"filename": a, "line": step, "name": phase_name} for a in ancestors]
        frames.append({"filename": self.device, "line": 0, "name": CATEGORIES[cat]})
        return frames


def _replay(profile: Profile, real: dict | None = None):
    """Rows to export (allocations, and frees of allocations memprof saw) and the layout:
    the real allocator's when recorded (`real`), else the model's replay."""
    mem = profile.memory
    size = mem["size"]
    keep = (size > 0) | ((size < 0) & (profile.alloc_of >= 0))
    if real is not None:
        return keep, real_layout(profile, keep, real)
    sim = simulate((mem["ptr"], np.where(keep, size, 0).astype(np.int64)),
                   return_timeline=False, return_layout=True)
    return keep, sim.layout


def _first_row(keep: np.ndarray, size: np.ndarray, limit: int) -> int:
    """The earliest row from which the trace has at most `limit` entries (a free is two)."""
    entries = np.where(keep, np.where(size > 0, 1, 2), 0)
    from_end = np.cumsum(entries[::-1])
    over = np.flatnonzero(from_end > limit)
    return int(size.size - over[0]) if over.size else 0


def _trace(profile: Profile, keep, layout, frames: _Frames, first: int) -> list[dict]:
    mem = profile.memory
    size, t_us = mem["size"], mem["t_ns"] // 1000
    addr, cat = layout["block_addr"], profile.category
    alloc_of = profile.alloc_of
    seg = layout["segments"]
    seg_at = np.searchsorted(seg["event"], np.arange(size.size + 1))
    out = []
    for i in np.flatnonzero(keep[first:]) + first:
        i = int(i)
        for k in range(seg_at[i], seg_at[i + 1]):
            out.append({"action": SEGMENT_ACTIONS[int(seg["action"][k])],
                        "addr": int(seg["addr"][k]), "size": int(seg["size"][k]), "stream": 0,
                        "time_us": int(t_us[i]), "frames": frames(i)})
        s = int(size[i])
        a = int(addr[i]) if s > 0 else int(addr[alloc_of[i]])
        entry = {"addr": a, "size": abs(s), "stream": 0, "time_us": int(t_us[i]),
                 "frames": frames(i), "category": CATEGORIES[int(cat[i])]}
        if s > 0:
            out.append(dict(entry, action="alloc"))
        else:
            out.append(dict(entry, action="free_requested"))
            out.append(dict(entry, action="free_completed"))
    for k in range(seg_at[-1], seg["event"].size):     # segment actions after the last row
        out.append({"action": SEGMENT_ACTIONS[int(seg["action"][k])],
                    "addr": int(seg["addr"][k]), "size": int(seg["size"][k]), "stream": 0,
                    "time_us": int(t_us[-1]) if t_us.size else 0, "frames": []})
    # the viewer (MemoryViz.js) expects the category "unknown" among categories it has seen
    out.append({"action": "snapshot", "addr": 0, "size": 0, "stream": 0,
                "time_us": int(t_us[-1]) if t_us.size else 0, "frames": [],
                "category": "unknown"})
    return out


def _segments(profile: Profile, keep, layout, frames: _Frames, device: int) -> list[dict]:
    """Segments alive at the end, each with its blocks (live allocations, gaps inactive)."""
    seg = layout["segments"]
    live: dict[int, tuple[int, bool]] = {}
    for a, s, act, small in zip(seg["addr"].tolist(), seg["size"].tolist(),
                                seg["action"].tolist(), seg["small"].tolist()):
        if act == 1:
            live[a] = (s, bool(small))
        elif act == 2:
            live.pop(a, None)
    size = profile.memory["size"]
    alive = np.flatnonzero(keep & (size > 0) & (profile.free_of < 0))
    addr = layout["block_addr"][alive]
    order = np.argsort(addr, kind="stable")
    alive, addr = alive[order], addr[order]
    bases = np.array(sorted(live), dtype=np.uint64)
    owner = np.searchsorted(bases, addr, side="right") - 1
    out = []
    for k, base in enumerate(bases.tolist()):
        total, small = live[base]
        blocks, at = [], base
        for i in alive[owner == k].tolist():
            a, bsize = int(layout["block_addr"][i]), int(layout["block_size"][i])
            if a > at:
                blocks.append({"address": at, "size": a - at, "requested_size": 0,
                               "state": "inactive", "frames": []})
            blocks.append({"address": a, "size": bsize, "requested_size": int(size[i]),
                           "state": "active_allocated", "frames": frames(i)})
            at = a + bsize
        if at < base + total:
            blocks.append({"address": at, "size": base + total - at, "requested_size": 0,
                           "state": "inactive", "frames": []})
        used = [b for b in blocks if b["state"] == "active_allocated"]
        out.append({"device": device, "address": base, "total_size": total, "stream": 0,
                    "allocated_size": sum(b["size"] for b in used),
                    "active_size": sum(b["size"] for b in used),
                    "requested_size": sum(b["requested_size"] for b in used),
                    "segment_type": "small" if small else "large", "segment_pool_id": (0, 0),
                    "is_expandable": False, "blocks": blocks,
                    "frames": [{"filename": frames.device, "line": 0,
                                "name": "segment (caching-allocator model)"}]})
    return out


def memory_snapshot(profile: Profile, max_entries: int = MAX_TRACE_ENTRIES) -> dict:
    """The profile in the layout torch.cuda.memory._snapshot() returns: "segments" alive at
    the end and "device_traces" (the last `max_entries` allocator actions)."""
    mem = profile.memory
    cuda = profile.device_type == DEVICE_CUDA
    device = int(mem["device_index"].max()) if cuda and mem.size else 0
    name = f"cuda:{device}" if cuda else "cpu"
    frames = _Frames(profile, name)
    real = recorded_segments(profile)   # a CUDA run: the allocator's own segments
    keep, layout = _replay(profile, real)
    first = _first_row(keep, mem["size"], max_entries)
    traces: list[list] = [[] for _ in range(device + 1)]
    traces[device] = _trace(profile, keep, layout, frames, first)
    segments = (real_segments(profile, keep, real, frames, device) if real
                else _segments(profile, keep, layout, frames, device))
    return {"segments": segments,
            "device_traces": traces,
            "memprof": {"device": name, "device_index": device,
                        "segments_from": REAL_SOURCE if real else SOURCE,
                        "trace_from_event": first, "events": int(mem.size),
                        "estimate": bool(profile.meta.get("estimate", False))}}
