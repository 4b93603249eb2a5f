"""Retained graphs seen while the training loop's frame is still alive.

The leak check (analyse.leaks) runs when the block ends, on the tensors alive then, and names
their holders from the frame that entered the block and the script's namespace. When the loop
runs in a function the block outlives - a script's `main()` under `memprof run`, `with
memprof.track(): train()` - that function has returned by then: its locals (`total_loss +=
loss`, `losses.append(out)`) and the graphs they kept are gone, and the leak is only growth
with no holder. So at a few step ends (the 2nd, 4th, 8th, ... step: a handful in a long run;
and after GROWTH_LOOK_AFTER step ends in a row with more allocated than the one before, which
finds a leak that starts late, between those) this recorder looks while the loop runs:
graphs made before the step that just ended are still alive only if something kept them,
and the frames on the stack name it. What it keeps is plain data (each graph's sequence
range, saved storages, its holder's path), never the tensors, so the run's memory is the
same.

It looks only when the innermost frame outside torch and memprof is a function other than
the one that entered the block; a loop in that frame, or at a script's top level, is the
end-of-block check's to see. Each look walks what the names on the loop's stack reach (not
every object): its time is recorded, and taken out of the step it falls in by the throughput
figures. It runs with the thread's trace and profile functions suspended (_C.untraced):
under a script's coverage tool or debugger each line of the walk was the tracer's event.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import asdict

from .. import _C
from .autograd_graphs import graph_tensors, storage_of, walk_graphs
from .recomputed_weights import recomputed_weights
from .holders import (frame_roots, is_library_frame, loop_frame, model_roots, namespaces_roots,
                      reachable_tensors)

FIRST_PROBE_STEP = 2     # steps completed at the first look; then 4, 8, 16, ...
#: step ends in a row with more allocated than the one before that make a look (a leak that
#: starts late in a long run, between the doubling looks); doubled after each look that
#: found nothing, up to MAX_GROWTH_LOOK_AFTER
GROWTH_LOOK_AFTER = 4
MAX_GROWTH_LOOK_AFTER = 256

#: one reference that a call's return rebinds: `loss`, `main.<locals>.loss`,
#: `trainer.last_loss` - no list, dict or closure cell on the way (those can grow)
_ONE_REFERENCE = re.compile(r"^(?:[^\[\]{}<>\s]+\.<locals>\.)?[\w.]+$")


def held_until_the_call_returns(graph, path: str | None, start: int, end: int) -> bool:
    """Whether a graph lies wholly in [start, end) of the sequence numbers - the step (or
    round) before the one that just ended - and one plain reference holds it. While
    `loss = train_step(x, y)` (or LBFGS's `loss = opt.step(closure)`) runs, the caller's
    `loss` still names the step before's loss, until the call returns and rebinds it: that
    is no leak. A graph held longer is older than that step at a later look, one kept in a
    list is among older ones that the list kept too. Only a graph whose backward released
    what it saved: one that still pins saved tensors (`backward(retain_graph=True)`, an
    evaluation output made with gradients on) holds memory through the whole next step."""
    return bool(path) and _ONE_REFERENCE.match(path) is not None and \
        start <= graph.min_seq and graph.max_seq < end and \
        all(ptr == graph.storage for ptr in graph.saved)


class LeakProbe:
    name = "leak_probe"

    def __init__(self):
        self._session = None
        self._next = FIRST_PROBE_STEP
        self._growth_look_after = GROWTH_LOOK_AFTER
        self._streak_looked = 0   # the growing streak's length at the last look it made
        self._record: dict | None = None
        self._looks: list[list] = []        # [steps completed, seconds] per look

    def install(self, session) -> None:
        self._session = session
        session.steps.on_step_end.append(self._step_end)

    def remove(self) -> None:
        if self._session is not None and self._step_end in self._session.steps.on_step_end:
            self._session.steps.on_step_end.remove(self._step_end)
        self._session = None

    def _step_end(self) -> None:
        steps = self._session.steps
        streak = _C.steps_growing()
        if streak < self._streak_looked:   # that streak ended: a new one counts from 0
            self._streak_looked = 0
        growing = streak - self._streak_looked >= self._growth_look_after
        if steps.step < self._next and not growing:
            return
        if steps.step >= self._next:
            self._next = steps.step * 2
        frame = loop_frame(sys._getframe(1))
        if frame is None or frame is self._session.frame or frame.f_code.co_name == "<module>":
            return
        t0 = time.perf_counter()
        found = False
        try:
            with _C.untraced():   # never the user's tracer's events (a coverage tool's)
                found = self._look(frame, steps.step, list(steps.step_seqs))
        except Exception as err:  # noqa: BLE001  (a look must never break training)
            if self._record is None:   # an earlier look's graphs are kept
                self._record = {"error": f"{type(err).__name__}: {err}"[:300]}
        self._looks.append([steps.step, time.perf_counter() - t0])
        if growing:   # while graphs are found, memory that keeps growing is looked at again
            self._streak_looked = streak
            self._growth_look_after = GROWTH_LOOK_AFTER if found else \
                min(2 * self._growth_look_after, MAX_GROWTH_LOOK_AFTER)

    def _look(self, frame, completed: int, boundaries: list[int]) -> bool:
        # the step that just ended is step completed-1: a graph of an earlier one survived
        # its backward and optimizer step (the analysis decides which, as for the end check).
        # Only what a name on the loop's stack reaches is looked at (this look exists to name
        # holders): a walk from those names, not a scan of every object, so a look costs
        # what the loop's variables reach, and the caches the step uses stay warm.
        before = boundaries[completed - 1]
        session = self._session
        # the model first, as the end-of-block check names it (`model.outputs`, not the path
        # a framework's frame had to it: Lightning's `optimizer_step.<locals>.model.outputs`)
        roots = model_roots(session.model, session.scope.named_roots())
        f = frame
        while f is not None and f is not session.frame:   # the loop's frame and its callers
            if not is_library_frame(f):
                roots += frame_roots(f)
            f = f.f_back
        roots += namespaces_roots(session.roots, frame)
        bounds: dict[int, int] = {}
        reached = list(reachable_tensors(roots, bounds))   # (shortest path, tensor), one walk
        holders = {id(t): path for path, t in reached}
        tensors = graph_tensors(t for _, t in reached)
        params = {storage_of(p)[0] for p in session.params()}
        graphs, truncated = walk_graphs(tensors, params, past_the_log=_C.log_full())
        kept = recomputed_weights(model_roots(session.model, session.scope.named_roots()))
        old = [g for g in graphs if boundaries[0] <= g.min_seq < before
               and g.tensor_id not in kept]   # old-style weight_norm's: kept by design
        # the step before's loss that the caller's variable names until this call returns
        # is recorded (the analysis judges by rounds of optimizers), but alone makes no record
        previous = boundaries[completed - 2] if completed >= 2 else boundaries[0]
        if all(held_until_the_call_returns(g, holders.get(g.tensor_id), previous, before)
               for g in old):
            return False
        _C.mark("leak_probe", completed)
        self._record = {
            "completed_steps": completed,
            # plain JSON: the saved storages as pairs (analyse.leaks turns them back)
            "graphs": [{**asdict(g), "shape": list(g.shape),
                        "saved": [[int(p), int(b)] for p, b in g.saved.items()],
                        "unlogged": sorted(g.unlogged)} for g in old],
            "holders": {str(g.tensor_id): holders[g.tensor_id] for g in old},
            "bounds": {str(g.tensor_id): bounds[g.tensor_id] for g in old
                       if g.tensor_id in bounds},
            "truncated": bool(truncated),
        }
        return True

    def record_nested(self, inner) -> dict | None:
        """What a block nested in this one (a script's own under `memprof run`) records as it
        ends: the last look that found graphs, where it was made while that block ran (its
        steps are the outer's, as the nested block's boundaries are). Its loop in a function
        that returned inside the block left it no finding, where under python its own probe
        had named `train.<locals>.lossi`. The looks' times stay the outer's."""
        rec = self._record
        if not rec or not rec.get("graphs") or rec["completed_steps"] <= inner.first_step:
            return None
        return {**rec, "looks": []}

    def record(self) -> dict | None:
        """The last look that found graphs of earlier steps (plain data), and every look's
        step and time: a look runs just after a step boundary, so its time would read as the
        next step's data wait (analyse.throughput takes it out)."""
        if self._record is None and not self._looks:
            return None
        return {**(self._record or {}), "looks": [list(x) for x in self._looks]}
