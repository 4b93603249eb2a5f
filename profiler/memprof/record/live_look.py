"""A look at the model and its optimizers while they live: at a few step ends, and at the
block's end where what those looks saw still lives.

Some findings read the objects, not the events (which parameters hold a gradient, which
have optimizer state): a look as the block ends sees them only if they outlive it. A loop in
`main()` under `memprof run` has returned and freed them by then, and the findings were lost
where the same loop at the script's top level had them. So the look also runs at the ends of
steps 2, 4, 8, 16, ... (the step clock's on_look_step: no call at the other steps), the
latest result kept with the number of steps it judged, and replaced at the block's end by
the end's look where that finds something, or where every model and optimizer the last look
saw is still alive (the end's look over a model freed since finds nothing: the finding was
lost). Each look's time is recorded (milliseconds for a model of hundreds of parameter
tensors), and taken out of the step it falls in by the throughput figures.
"""
from __future__ import annotations

import time
import weakref


class LiveLook:
    """Base of a recorder that defines `name` and `_look(scope) -> dict | None` (what it
    reads from the live objects, None: nothing to say). Its record: the latest look's result,
    with `steps` where it was judged before the block's end (the steps ended at that look)."""
    name = ""

    def __init__(self):
        self.session = None
        self._result: dict | None = None
        self._saw: list[weakref.ref] = []   # the models and optimizers the last look saw
        self._looks: list[list] = []        # [steps ended, seconds] per look at a step end

    def install(self, session) -> None:
        self.session = session
        session.steps.on_look_step.append(self._step_look)

    def remove(self) -> None:
        """The block ends: looked at once more, where the objects the loop's looks saw live."""
        session = self.session
        if session is None:
            return
        if self._step_look in session.steps.on_look_step:
            session.steps.on_look_step.remove(self._step_look)
        try:
            result = self._look(session.scope)
        except Exception:  # noqa: BLE001  (a recorder never breaks the user's code)
            result = None
        # nothing to say now stands only where all the last look saw lives: else that
        # look's result does (its model freed, or alive beside others)
        if result is not None or all(ref() is not None for ref in self._saw):
            self._result = result

    def _step_look(self) -> None:
        session, t0 = self.session, time.perf_counter()
        try:
            result = self._look(session.scope)
            self._saw = [weakref.ref(o) for o in (*session.scope.root_modules(),
                                                  *session.steps.stepped())]
            self._result = None if result is None else {**result, "steps": session.steps.step}
        except Exception:  # noqa: BLE001  (a look must never break training; the one
            pass           # before stands)
        self._looks.append([session.steps.step, time.perf_counter() - t0])

    def record_nested(self, inner) -> dict | None:
        """What a block nested in this one (a script's own under `memprof run`) records as it
        ends: the same look, over its model (this block's answer comes only at its own end;
        this block's step clock saw the optimizers step)."""
        try:
            return self._look(inner.scope if inner.scope.root_modules() else self.session.scope)
        except Exception:  # noqa: BLE001  (a recorder never breaks the user's code)
            return None

    def record(self) -> dict | None:
        """The latest result (None: nothing found) and the looks' times at step ends."""
        if self._result is None and not self._looks:
            return None
        return {**(self._result or {}), "looks": [list(x) for x in self._looks]}
