"""`Profile`: the recorded events of one tracked run and the questions they answer.

Data flows one way: native events (plus the blocks that already existed when tracking began,
prepended as synthetic allocations) -> pairing of each allocation with its free -> a category
per allocation -> timelines, peak, breakdowns. Everything is vectorised numpy or a native loop
over the columns (memprof._C, where numpy needed many whole-stream passes): a profile of
millions of events is analysed without a Python object per event.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np

from . import _C, profile_file, weight_recomputation
from .allocation_lookup import NO_MODULES, forward_modules, last_per_allocation, \
    snapshot_hits, snapshot_modules
from .finding import Finding
from .profile_display import Displayed
from .record.distributed import rank_path
from .record.events import (CAT_ACTIVATIONS, CAT_COMMUNICATION, CAT_OTHER, CAT_TEMPORARIES,
                            CATEGORIES, DEVICE_CPU, DEVICE_CUDA, KIND_MARK, KIND_OUT_OF_MEMORY,
                            PHASES, PHASE_BACKWARD, PHASE_FORWARD, PHASE_OTHER)
from .run import Run

OUTSIDE_MODULES = "<outside modules>"
NO_OP = "<no op>"
DEVICE_NAMES = {DEVICE_CPU: "cpu", DEVICE_CUDA: "cuda"}


@dataclass
class StepRecord:
    index: int
    start: int                # first memory-event index of the step (in Profile.memory)
    end: int                  # one past its last memory-event index
    peak: int                 # peak live bytes inside the step
    live_at_end: int          # live bytes at the step boundary
    allocated: int            # bytes allocated during the step

    def as_dict(self) -> dict:
        return asdict(self)


class Profile(Displayed):
    """Events of one tracked run plus the context needed to explain them. `events` is the full
    stream (allocations, frees, OOM reports, markers) in time order, with blocks that existed
    before tracking prepended as allocations whose `thread` is -1. `modules[i]` is the
    qualified name of module id i ("" is the root model)."""

    def __init__(self, run: Run, findings: list[Finding] | None = None):
        if not isinstance(run, Run):
            raise TypeError(f"run: expected a memprof.run.Run, got {type(run).__name__}")
        self.run = run
        self.findings: list[Finding] = list(findings or [])

    @property
    def events(self) -> np.ndarray:
        """Every event in one time-ordered stream, rebuilt on each access (a copy): queries
        read the run's two streams (`memory` and the side records) instead."""
        return self.run.events

    @property
    def strings(self) -> list[str]:
        return self.run.strings

    @property
    def modules(self) -> list[str]:
        return self.run.modules

    @property
    def seq_records(self) -> np.ndarray:
        return self.run.seq_records

    @property
    def snapshots(self) -> list:
        return self.run.snapshots

    @property
    def meta(self) -> dict:
        return self.run.meta

    # ------------------------------------------------------------------ derived event views
    @property
    def device_type(self) -> int:
        """The device analysed: CUDA when any CUDA memory was recorded, else CPU."""
        return self.run.streams.device_type

    @property
    def device(self) -> str:
        return DEVICE_NAMES.get(self.device_type, f"device{self.device_type}")

    @property
    def memory(self) -> np.ndarray:
        """Allocation and free events of the analysed device, in order (the run's own array,
        not a copy)."""
        return self.run.streams.memory

    @cached_property
    def _side_index(self) -> np.ndarray:
        """Index in `events` of each record that is not in `memory` (markers, OOM reports,
        other devices)."""
        return self.run.streams.side_index()

    def _memory_position(self, event_index):
        """Number of memory events strictly before the given index (or array of indices) into
        `events`."""
        return event_index - np.searchsorted(self._side_index, event_index, side="left")

    @cached_property
    def _columns(self) -> tuple[np.ndarray, ...]:
        """(free_of, alloc_of, size, phase, module, effective_size, live) from one native pass.

        Addresses are unique while a block is alive: a table of the blocks alive pairs each
        free with its allocation. The same pass, which reads every record anyway, copies the
        size, phase and module columns out contiguous (the whole-stream passes read them often,
        and a column of the 72-byte records touches one cache line per element) and sums the
        live bytes. The module column is event_module's to rewrite.
        """
        mem = self.memory
        return _C.pair_allocations(mem["ptr"], mem["size"], mem["phase"], mem["module"])

    @property
    def _sizes(self) -> np.ndarray:
        return self._columns[2]

    @property
    def _phases(self) -> np.ndarray:
        return self._columns[3]

    @property
    def free_of(self) -> np.ndarray:
        """For each allocation the index of its free (-1: alive at the end)."""
        return self._columns[0]

    @property
    def alloc_of(self) -> np.ndarray:
        """For each free the index of its allocation (-1: a block from before the stream)."""
        return self._columns[1]

    @cached_property
    def effective_size(self) -> np.ndarray:
        """Signed size per memory event, with frees of blocks memprof never saw allocated
        counted as 0 (their allocation is not in the profile). Read-only: copy to change."""
        size = self._columns[5]
        size.setflags(write=False)
        return size

    @cached_property
    def untracked_frees(self) -> int:
        """Frees of blocks allocated before tracking that memprof did not know about."""
        return int(((self._sizes < 0) & (self.alloc_of < 0)).sum())

    @property
    def _live(self) -> np.ndarray:
        return self._columns[6]

    def live_bytes(self, reserved: bool = False) -> np.ndarray:
        """Live bytes after each memory event (the timeline). `reserved=True`: the caching
        allocator's reserved bytes as it reported them (CUDA only)."""
        if reserved:
            if self.device_type != DEVICE_CUDA:
                raise ValueError("reserved=True: reserved bytes are reported by the CUDA caching "
                                 "allocator only; this profile's device is the CPU")
            return self.memory["total_reserved"].copy()
        return self._live.copy()

    # ------------------------------------------------------------------ module / op attribution
    @cached_property
    def event_module(self) -> np.ndarray:
        """Module id per memory event; backward events get the module that ran the forward op
        whose autograd node is executing."""
        mem = self.memory
        module = self._columns[4]   # a copy made for this, rewritten in place
        bwd = np.flatnonzero((self._phases == PHASE_BACKWARD) & (mem["seq"] >= 0) & (module < 0))
        if bwd.size:
            uniq, inv = np.unique(mem["seq"][bwd], return_inverse=True)
            module[bwd] = forward_modules(self.seq_records, uniq)[inv]
        # Gradients and optimizer state belong to their parameter's module.
        _, allocs, storage = self.named_storages
        owners = snapshot_modules(self.snapshots)[storage]
        named = np.flatnonzero(owners != NO_MODULES)
        last = named[last_per_allocation(allocs[named])]
        module[allocs[last]] = owners[last]
        weight_recomputation.own(self, module)   # a parametrization's: its module's
        return self._frees_take_their_alloc(module)

    @cached_property
    def named_storages(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(snapshot, allocation event, storage) per storage a snapshot names alive at its
        marker, in snapshot order (allocation_lookup.snapshot_hits); found once for the
        categories and the modules."""
        markers = np.array([s.marker for s in self.snapshots], dtype=np.int64)
        return snapshot_hits(self.memory, self.snapshots, self._memory_position(markers))

    def _frees_take_their_alloc(self, values: np.ndarray, unknown=None) -> np.ndarray:
        """Each free gets its allocation's value; a free of a block from before tracking gets
        `unknown` (None: keeps its own value). In place, one native pass."""
        _C.frees_take_their_alloc(values, self._sizes, self.alloc_of, unknown)
        return values

    # ------------------------------------------------------------------ categories
    def markers(self, label: str | None = None) -> list[dict]:
        """Markers in order: forward_start, forward_end, backward_call (a backward() call),
        backward_start (a pass of the autograd engine), backward_end, optimizer_start, step
        (the step boundary, after optimizer.step), snapshot; with their times in ns."""
        return [m for m in self._all_markers if label is None or m["label"] == label]

    @cached_property
    def _all_markers(self) -> list[dict]:
        side = self.run.streams.side
        sel = np.flatnonzero(side["kind"] == KIND_MARK)
        pos, idx = self.run.streams.side_position[sel], self._side_index[sel]
        return [{"label": self.strings[int(side["op"][j])], "t_ns": int(side["t_ns"][j]),
                 "value": int(side["ptr"][j]), "position": int(p), "event": int(i)}
                for j, p, i in zip(sel, pos, idx)]

    def marker_positions(self, label: str) -> np.ndarray:
        return np.array([m["position"] for m in self._all_markers if m["label"] == label],
                        dtype=np.int64)

    @cached_property
    def category(self) -> np.ndarray:
        """Category code per memory event (a free carries its allocation's category)."""
        # One native loop over the allocations (memprof._C.allocation_categories), by rule:
        # forward allocations that outlive their forward pass (up to the next forward_end
        # marker) are activations, ones freed before it temporaries; other allocations freed
        # within their run of one phase are temporaries; anything made outside backward and
        # released by backward was saved for it (e.g. the loss's own saved tensors):
        # activations; anything made inside a collective (c10d::allreduce_,
        # _c10d_functional::all_gather_into_tensor, the backend's staging): communication.
        c10d = [i for i, name in enumerate(self.strings) if "c10d" in name.split("::")[0]]
        cat = _C.allocation_categories(
            self._sizes, self._phases, self.free_of, self.marker_positions("forward_end"),
            self.memory["op"], c10d, activations=CAT_ACTIVATIONS, temporaries=CAT_TEMPORARIES,
            other=CAT_OTHER, communication=CAT_COMMUNICATION)
        # Snapshots name parameters, gradients and optimizer state by storage (and the
        # buffers handed to collectives: record.distributed); a later one over an earlier.
        snap, allocs, _ = self.named_storages
        last = last_per_allocation(allocs)
        categories = np.array([s.category for s in self.snapshots] or [0], dtype=np.int8)
        cat[allocs[last]] = categories[snap[last]]
        weight_recomputation.mark(self, cat)   # a weight recomputed from parameters
        return self._frees_take_their_alloc(cat, CAT_OTHER)   # unknown older blocks: other

    # ------------------------------------------------------------------ peak and alive sets
    @cached_property
    def peak_index(self) -> int:
        """Memory position of the (first) peak of live bytes; -1 for an empty profile."""
        return int(np.argmax(self._live)) if self._live.size else -1

    @property
    def peak(self) -> int:
        return int(self._live[self.peak_index]) if self.peak_index >= 0 else 0

    def _name(self, sid: int, default: str) -> str:
        return self.strings[sid] if 0 <= sid < len(self.strings) else default

    def module_name(self, mid: int) -> str:
        if mid < 0 or mid >= len(self.modules):
            return OUTSIDE_MODULES
        name, root = self.modules[mid], self.meta.get("model_class") or "model"
        # a bare container's children by index under its class: `Sequential.1`, not `1`
        return f"{root}.{name}" if name[:1].isdigit() else name or root

    def describe_event(self, pos: int) -> dict:
        """When and where a memory event happened, in words."""
        e = self.memory[pos]
        return {
            "index": int(pos),
            "time_s": (int(e["t_ns"]) - int(self.meta.get("t0_ns", e["t_ns"]))) / 1e9,
            "step": int(e["step"]),
            "phase": PHASES[int(e["phase"])] if 0 <= e["phase"] < len(PHASES) else "other",
            "module": self.module_name(int(self.event_module[pos])),
            "op": self._name(int(e["op"]), NO_OP),
            "node": self._name(int(e["node"]), "") or None,
            "size": int(e["size"]),
            "live_bytes": int(self._live[pos]),
        }

    @property
    def peak_event(self) -> dict | None:
        return self.describe_event(self.peak_index) if self.peak_index >= 0 else None

    def _resolve_at(self, at: str | int | tuple) -> int:
        """Memory position for 'peak', 'end', a step index (its boundary) or
        ("position", n): just after memory event n (-1: before the first)."""
        n = self.memory.size
        if isinstance(at, tuple) and len(at) == 2 and at[0] == "position":
            if not -1 <= int(at[1]) < n:
                raise ValueError(f"at={at!r}: position must be in [-1, {n})")
            return int(at[1])
        if at == "peak":
            return self.peak_index
        if at == "end":
            return n - 1
        if isinstance(at, (int, np.integer)) and not isinstance(at, bool):
            steps = self.steps
            if not 0 <= at < len(steps):
                raise ValueError(f"at={at}: expected 'peak', 'end' or a step index in "
                                 f"[0, {len(steps)})")
            return steps[at].end - 1
        raise ValueError(f"at={at!r}: expected 'peak', 'end', a step index or "
                         "('position', n)")

    def alive_at(self, at: str | int = "peak") -> np.ndarray:
        """Indices (memory positions) of the allocations alive just after position `at`."""
        pos = self._resolve_at(at)
        if pos < 0:
            return np.zeros(0, dtype=np.int64)
        mem = self.memory
        idx = np.flatnonzero(self._sizes[:pos + 1] > 0)
        free_of = self.free_of[idx]
        return idx[(free_of < 0) | (free_of > pos)]

    def breakdown(self, by: str = "category", at: str | int = "peak") -> dict[str, int]:
        """Bytes alive at `at`, grouped by category, module, op, node, phase or thread (the
        recording's thread index; largest first)."""
        alive = self.alive_at(at)
        sizes = self.memory["size"][alive]
        if by == "category":
            keys = self.category[alive]
            names = {i: c for i, c in enumerate(CATEGORIES)}
            out = {c: 0 for c in CATEGORIES}
        elif by == "module":
            keys = self.event_module[alive]
            names = None
            out = {}
        elif by in ("op", "node"):
            keys = self.memory["op" if by == "op" else "node"][alive]
            names = None
            out = {}
        elif by == "phase":
            keys = self.memory["phase"][alive]
            names = {i: p for i, p in enumerate(PHASES)}
            out = {}
        elif by == "thread":
            keys = self.memory["thread"][alive]
            model_thread = self.model_thread
            names = {int(t): "before tracking" if t < 0 else f"thread {int(t)}" + (
                " (runs the model)" if t == model_thread else "") for t in np.unique(keys)}
            out = {}
        else:
            raise ValueError(f"by={by!r}: expected one of 'category', 'module', 'op', 'node', "
                             "'phase', 'thread'")
        if alive.size:
            uniq, inv = np.unique(keys, return_inverse=True)
            sums = np.bincount(inv, weights=sizes.astype(np.float64)).astype(np.int64)
            for k, s in zip(uniq, sums):
                k = int(k)
                if names is not None:
                    name = names.get(k, "other")
                elif by == "module":
                    name = self.module_name(k)
                elif by == "node":
                    name = self._name(k, "<not in backward>")
                else:
                    name = self._name(k, NO_OP)
                out[name] = out.get(name, 0) + int(s)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    @cached_property
    def model_thread(self) -> int | None:
        """The thread (index) that made most forward allocations: the training loop's."""
        fwd = self.memory["thread"][(self.memory["phase"] == PHASE_FORWARD) & (self._sizes > 0)]
        return int(np.bincount(fwd).argmax()) if fwd.size else None

    def module_tree(self, at: str | int = "peak") -> dict[str, dict[str, int]]:
        """Per module qualified name: self bytes and total bytes (self + descendants)."""
        self_bytes = {}
        alive = self.alive_at(at)
        if alive.size:
            mods = self.event_module[alive]
            uniq, inv = np.unique(mods, return_inverse=True)
            sums = np.bincount(inv, weights=self.memory["size"][alive].astype(np.float64))
            for m, s in zip(uniq, sums):
                self_bytes[int(m)] = int(s)
        tree = {}
        for mid, name in enumerate(self.modules):
            prefix = name + "." if name else ""
            total = sum(b for m, b in self_bytes.items()
                        if 0 <= m < len(self.modules)
                        and (m == mid or self.modules[m].startswith(prefix)))
            tree[name] = {"self": self_bytes.get(mid, 0), "total": total}
        return tree

    def activations_by_module(self) -> dict[str, int]:
        """Forward activation bytes each module allocated, summed over the run's forward passes
        (memory the module's forward left alive for backward or beyond)."""
        mem = self.memory
        sel = np.flatnonzero((self._sizes > 0) & (self.category == CAT_ACTIVATIONS)
                             & (self._phases == PHASE_FORWARD))
        out: dict[str, int] = {}
        if sel.size:
            mods = self.event_module[sel]
            uniq, inv = np.unique(mods, return_inverse=True)
            sums = np.bincount(inv, weights=mem["size"][sel].astype(np.float64))
            for m, b in zip(uniq, sums):
                out[self.module_name(int(m))] = int(b)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    # ------------------------------------------------------------------ saved tensors per node
    @cached_property
    def saved_by_node(self) -> dict[str, int]:
        """Activation bytes released by each autograd node in backward: what that node of the
        graph held (shared storages count once, at the node that released them last)."""
        mem = self.memory
        frees = np.flatnonzero((self._sizes < 0) & (self._phases == PHASE_BACKWARD))
        if frees.size == 0:
            return {}
        owner = self.alloc_of[frees]
        ok = owner >= 0
        frees, owner = frees[ok], owner[ok]
        act = self.category[owner] == CAT_ACTIVATIONS
        frees, owner = frees[act], owner[act]
        out: dict[str, int] = {}
        # one name per distinct (node, op) pair, not per event: profiles have millions
        pairs = mem["node"][frees].astype(np.int64) << 32 | (mem["op"][frees].astype(np.int64)
                                                             & 0xFFFFFFFF)
        uniq, first, inv = np.unique(pairs, return_index=True, return_inverse=True)
        sums = np.bincount(inv, weights=mem["size"][owner].astype(np.float64))
        for k in np.argsort(first, kind="stable"):     # in order of first release
            i = frees[first[k]]
            name = self._name(int(mem["node"][i]), "") or self._name(int(mem["op"][i]), NO_OP)
            out[name] = out.get(name, 0) + int(round(sums[k]))
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    # ------------------------------------------------------------------ steps
    @cached_property
    def steps(self) -> list[StepRecord]:
        """One record per optimizer step (or prof.step() call); a trailing partial step counts."""
        bounds = self.marker_positions("step")
        n = self.memory.size
        edges = [0] + [int(b) for b in bounds]
        # Work after the last boundary is a partial step if it allocated in a pass (evaluation,
        # a step cut short) or the run raised or filled the log; bookkeeping (a running loss, a
        # Trainer's summary) is recorded, no step (max_steps=3 read 4 steps).
        tail = self._sizes[edges[-1]:] > 0
        cut = self.meta.get("error") or self.meta.get("dropped")
        if tail.any() and (len(edges) == 1 or cut
                           or (self._phases[edges[-1]:][tail] != PHASE_OTHER).any()):
            edges.append(n)
        live, size, out = self._live, self._sizes, []
        for i in range(len(edges) - 1):
            s, e = edges[i], edges[i + 1]
            if e <= s and i > 0:
                continue
            seg = live[s:e]
            before = int(live[s - 1]) if s > 0 else 0
            out.append(StepRecord(
                index=len(out), start=s, end=e,
                peak=int(seg.max()) if seg.size else before,
                live_at_end=int(live[e - 1]) if e > 0 else 0,
                allocated=int(np.maximum(size[s:e], 0).sum())))
        return out

    @property
    def partial_last_step(self) -> bool:
        """The last of `steps` is work after the last step boundary (an evaluation pass, a
        loop cut short), not a step the training loop finished; also the only one of a run
        that raised before its first boundary (an OOM in the first step read "steps 1", as
        if that step had finished)."""
        bounds = self.marker_positions("step")
        if not bounds.size:
            return bool(self.steps) and bool(self.meta.get("error"))
        return bool(self.steps) and self.steps[-1].start >= int(bounds[-1])

    @property
    def steps_label(self) -> str:
        """Finished steps, the partial one apart: '5' or '5 + partial'."""
        return f"{len(self.steps) - 1} + partial" if self.partial_last_step else \
            str(len(self.steps))

    @property
    def truncated(self) -> str | None:
        """What a run cut short by the event capacity covers (a 50-step run read as a complete
        12-step one); None when nothing was dropped."""
        dropped, marked = int(self.meta.get("dropped") or 0), self.meta.get("steps_marked")
        return None if not dropped else (
            f"the event log filled up (capacity {int(self.meta.get('capacity', 0)):,} events; "
            f"{dropped:,} dropped): the peak, steps and findings cover steps 0-"
            f"{max(0, len(self.steps) - 1)}{f' of {int(marked)}' if marked else ''} only; "
            "track(capacity=...) or memprof run --capacity records more")

    # ------------------------------------------------------------------ summaries and reports
    @cached_property
    def oom_events(self) -> list[dict]:
        """Out-of-memory reports, in order: the request, the allocator's totals, and where it
        happened (step, phase, module, op, autograd node); `position` is the number of memory
        events of the analysed device before it (what was alive: at=("position", position-1));
        `dropped_before` > 0: the event log had filled before it."""
        side = self.run.streams.side
        t0 = int(self.meta.get("t0_ns", 0))
        out = []
        for j in np.flatnonzero(side["kind"] == KIND_OUT_OF_MEMORY):
            e, i = side[j], int(self._side_index[j])
            module = int(e["module"])
            if module < 0 and e["phase"] == PHASE_BACKWARD and e["seq"] >= 0:
                module = int(forward_modules(self.seq_records, np.array([e["seq"]]))[0])
            out.append({
                "requested": int(e["size"]), "total_allocated": int(e["total_allocated"]),
                "total_reserved": int(e["total_reserved"]),
                "device": DEVICE_NAMES.get(int(e["device_type"]), "?"),
                "device_type": int(e["device_type"]),
                "device_index": int(e["device_index"]), "event": int(i),
                "position": int(self.run.streams.side_position[j]),
                "time_s": (int(e["t_ns"]) - t0) / 1e9 if t0 else None,
                "step": int(e["step"]),
                "phase": PHASES[int(e["phase"])] if 0 <= e["phase"] < len(PHASES) else "other",
                "module": self.module_name(module), "op": self._name(int(e["op"]), NO_OP),
                "node": self._name(int(e["node"]), "") or None,
                # memory events the log dropped before it (its capacity spent): what was
                # alive at this moment is not in the profile
                "dropped_before": int(e["ptr"])})
        return out

    def summary(self) -> dict[str, Any]:
        """Plain, JSON-serialisable answers."""
        mem = self.memory
        return {
            "device": self.device,
            "events": int(mem.size),
            "dropped_events": int(self.meta.get("dropped", 0)),
            "truncated": self.truncated,
            "peak_bytes": self.peak,
            "peak_event": self.peak_event,
            "end_bytes": int(self._live[-1]) if self._live.size else 0,
            "by_category_at_peak": self.breakdown("category"),
            "by_module_at_peak": self.breakdown("module"),
            "by_op_at_peak": dict(list(self.breakdown("op").items())[:20]),
            "saved_by_node": dict(list(self.saved_by_node.items())[:20]),
            "activations_by_module": dict(list(self.activations_by_module().items())[:20]),
            "steps": [s.as_dict() for s in self.steps],
            "out_of_memory": self.oom_events,
            "findings": [f.as_dict() for f in self.findings],
            "error": self.meta.get("error"),
            "meta": {k: v for k, v in self.meta.items() if _jsonable(v)},
        }

    # ------------------------------------------------------------------ consumers
    @property
    def throughput(self) -> dict:
        """Step time, phases, samples/s: as the tracker's, for a profile loaded from a file."""
        import memprof  # the package root reaches the analyses (they read this class)
        return memprof.analyse.throughput.summarize(self)

    @property
    def health(self) -> dict | None:
        """Training health, as the tracker's; None without health=True or log()."""
        import memprof
        return memprof.analyse.health.summarize(self)

    def report(self, console=None, top: int = 8) -> None:
        """Print the terminal report (memprof.show(self))."""
        import memprof  # the package root dispatches to the report layer
        memprof.show(self, console=console, top=top)

    def export(self, path: str) -> str:
        """Export for other tools, by extension (memprof.export(self, path)); a rank's
        profile of a job to `<name>.rank<R>.<ext>`, as save() names it."""
        import memprof
        return memprof.export(self, path)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> str:
        """Write a versioned, checksummed file atomically; memprof.load() reads it back; the
        path written is returned. A rank's profile of a job (torchrun) goes to
        `<name>.rank<R>.memprof`, as track(path=...) names it: every rank saving
        `prof.save("run.memprof")` kept the last rank's file only. A path where no file can be
        made, or where a file that is no profile lies, is a ValueError."""
        rank, world = self.meta.get("rank"), self.meta.get("world_size")
        if rank is not None and world is not None and int(world) > 1:
            path = rank_path(path, int(rank))
        # as track(path=) and `memprof run -o`: `prof.save("train.py")` replaced the script
        problem = profile_file.unwritable(path)
        if problem is None and not profile_file.may_replace(path):
            problem = ("exists and is not a memprof profile (it would be replaced); give "
                       "another file name")
        if problem is not None:
            raise profile_file.UnwritablePath(f"save({path!r}): {problem}", problem)
        return profile_file.write(self.run, self.findings, path)

    @classmethod
    def load(cls, path: str) -> "Profile":
        run, findings = profile_file.read(path)
        return cls(run, findings)


def _jsonable(v) -> bool:
    try:
        return json.dumps(v) is not None
    except (TypeError, ValueError):
        return False


def load(path: str) -> Profile:
    """Read a profile written by Profile.save()."""
    return Profile.load(path)
