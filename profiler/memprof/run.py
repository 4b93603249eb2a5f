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

from .record.events import EVENT_DTYPE, SEQ_DTYPE
from .record.snapshots import Snapshot


@dataclass
class LiveContext:
    """Python objects of the recorded process, for checks that must look at live state."""
    model: Any = None
    optimizer: Any = None
    frame: Any = None
    roots: list = field(default_factory=list)       # (prefix, namespace dict)
    params: list = field(default_factory=list)      # every parameter seen


@dataclass
class Run:
    events: np.ndarray
    strings: list[str]
    modules: list[str]
    seq_records: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=SEQ_DTYPE))
    snapshots: list[Snapshot] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    step_seqs: list[int] = field(default_factory=list)   # autograd counter at step boundaries
    records: dict = field(default_factory=dict)          # recorder name -> plain data
    live: LiveContext | None = None

    def __post_init__(self):
        if self.events.dtype != EVENT_DTYPE:
            raise TypeError(f"events: expected dtype EVENT_DTYPE, got {self.events.dtype}")

    @classmethod
    def from_session(cls, session) -> "Run":
        """The Run of a stopped memprof.record.session.Session."""
        src = session.outer or session
        records = dict(session.records)
        records["logs"] = [list(x) for x in src.logs]
        records["backward"] = list(src.backward.calls)
        live = LiveContext(model=src.model, optimizer=src.steps.optimizer, frame=src.frame,
                           roots=list(src.roots), params=src.params())
        return cls(events=session.events, strings=session.strings,
                   modules=session.module_names, seq_records=session.seq_records,
                   snapshots=session.snapshot_list, meta=dict(session.meta),
                   step_seqs=list(src.steps.step_seqs), records=records, live=live)
