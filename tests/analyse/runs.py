"""Hand-built Runs: event streams written out by hand, so that an analysis is tested on exactly
the situation it must judge, without recording anything."""
from __future__ import annotations

import numpy as np

from memprof.profile import Profile
from memprof.record.events import (DEVICE_CPU, EVENT_DTYPE, KIND_MARK, KIND_MEMORY,
                                   PHASES)
from memprof.run import Run


class RunBuilder:
    """alloc/free/mark calls in time order -> a Run (one CPU device, 1 us per event)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.strings: list[str] = []
        self.modules: list[str] = [""]
        self.phase = "other"
        self.step = 0
        self.records: dict = {}
        self.step_seqs: list[int] = []

    def _sid(self, s: str) -> int:
        if s not in self.strings:
            self.strings.append(s)
        return self.strings.index(s)

    def _row(self, **kw) -> None:
        row = {"t_ns": 1000 * (len(self.rows) + 1), "op": -1, "node": -1, "module": -1,
               "seq": -1, "step": self.step, "phase": PHASES.index(self.phase),
               "device_type": DEVICE_CPU, "kind": KIND_MEMORY}
        row.update(kw)
        self.rows.append(row)

    def alloc(self, ptr: int, size: int, op: str = "aten::empty") -> "RunBuilder":
        self._row(ptr=ptr, size=size, op=self._sid(op))
        return self

    def free(self, ptr: int, size: int) -> "RunBuilder":
        self._row(ptr=ptr, size=-size)
        return self

    def mark(self, label: str, value: int | None = None, t_ns: int | None = None) -> "RunBuilder":
        self._row(ptr=self.step if value is None else value, size=0, op=self._sid(label),
                  kind=KIND_MARK)
        if t_ns is not None:
            self.rows[-1]["t_ns"] = t_ns
        if label == "step":
            self.step += 1
        return self

    def run(self) -> Run:
        ev = np.zeros(len(self.rows), dtype=EVENT_DTYPE)
        for i, row in enumerate(self.rows):
            for k, v in row.items():
                ev[k][i] = v
        return Run(events=ev, strings=self.strings, modules=self.modules,
                   step_seqs=self.step_seqs, records=self.records, meta={"model_class": "M"})

    def profile(self) -> Profile:
        return Profile(self.run())
