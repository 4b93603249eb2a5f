"""`Run`: the frozen result of one recording session - plain data that analyses read.

Events, the strings and module names they refer to, the autograd sequence records, the
category snapshots, each recorder's records, and - only until the leak check has run - the
live context that check needs (the model, the optimizer, the frame that ran the block and
other namespaces to search for holders). Nothing here installs or analyses anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .nested_steps import own_numbering
from .record.event_streams import EventStreams
from .record.events import EVENT_DTYPE, SEQ_DTYPE
from .record.recomputed_weights import parametrization_lists
from .record.snapshots import Snapshot


@dataclass
class LiveContext:
    """Python objects of the recorded process, for checks that must look at live state."""
    model: Any = None
    optimizer: Any = None
    frame: Any = None
    roots: list = field(default_factory=list)       # (prefix, namespace dict)
    params: list = field(default_factory=list)      # every parameter seen
    # auto mode (no model given: `memprof run`): (what the code calls it, module) per root
    # module that ran, where the block's frame is memprof's own and names none of them
    named_roots: list = field(default_factory=list)


class Run:
    """`events=`: one interleaved, time-ordered stream (hand-built runs, files), split here;
    or `streams=`: the two streams as the session took them (no copy)."""

    def __init__(self, events: np.ndarray | None = None, strings: list[str] | None = None,
                 modules: list[str] | None = None, seq_records: np.ndarray | None = None,
                 snapshots: list[Snapshot] | None = None, meta: dict | None = None,
                 step_seqs: list[int] | None = None, records: dict | None = None,
                 live: LiveContext | None = None, *, streams: EventStreams | None = None):
        if (events is None) == (streams is None):
            raise TypeError("Run: expected exactly one of events= (an EVENT_DTYPE array) or "
                            "streams= (an EventStreams)")
        if events is not None and (not isinstance(events, np.ndarray)
                                   or events.dtype != EVENT_DTYPE):
            raise TypeError(f"events: expected dtype EVENT_DTYPE, got "
                            f"{getattr(events, 'dtype', type(events).__name__)}")
        self.streams = streams if streams is not None else EventStreams.split(events)
        self.strings = list(strings or [])
        self.modules = list(modules or [])
        self.seq_records = (np.zeros(0, dtype=SEQ_DTYPE) if seq_records is None
                            else seq_records)
        self.snapshots = list(snapshots or [])
        self.meta = dict(meta or {})
        self.step_seqs = list(step_seqs or [])          # autograd counter at step boundaries
        self.records = dict(records or {})              # recorder name -> plain data
        self.live = live

    @property
    def events(self) -> np.ndarray:
        """Every event in one time-ordered stream: built on each access (a copy of the run's
        events), for consumers that want the interleaving; queries read `streams`."""
        return self.streams.merged()

    @classmethod
    def from_session(cls, session) -> "Run":
        """The Run of a stopped memprof.record.session.Session."""
        src = session.outer or session
        records = dict(session.records)
        records["logs"] = [list(x) for x in src.logs]
        records["backward"] = src.backward.noted()
        records["step_owners"] = list(src.steps.step_owners)   # analyse.turns
        records["skipped_steps"] = list(src.steps.skipped)     # by a GradScaler
        # a nested block's first step in the outer's numbering (own_numbering renumbers it)
        records["first_step"] = int(getattr(session, "first_step", 0))
        # torch's parametrization containers, by module id (weight_recomputation)
        records["parametrizations"] = parametrization_lists(src.scope)
        # a nested block's own model, optimizer and frame (its leak check's), the outer's
        # roots where it named none (a block without a model inside `memprof run`)
        own = session if session.model is not None or session.frame is not None else src
        named = own.scope.named_roots() or src.scope.named_roots() \
            if own.model is None else []
        live = LiveContext(model=own.model, optimizer=own.steps.optimizer or src.steps.optimizer,
                           frame=own.frame, roots=list(src.roots),
                           params=(own if own.model is not None else src).params(),
                           named_roots=named)
        meta = dict(session.meta)
        step_seqs = list(src.steps.step_seqs)
        if session.outer is not None:   # its own steps from 0, as python numbers them
            step_seqs = own_numbering(session.streams, session.strings, step_seqs, records,
                                      meta)
        return cls(streams=session.streams, strings=session.strings,
                   modules=session.module_names, seq_records=session.seq_records,
                   snapshots=session.snapshot_list, meta=meta,
                   step_seqs=step_seqs, records=records, live=live)
