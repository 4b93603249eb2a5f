"""Parameters an optimizer updates that never got a gradient, as the block ends.

A block run under `checkpoint(block, x, use_reentrant=True)` whose input needs no gradient
(raw features, the output of a frozen embedding) passes none to its weights: the optimizer
steps, the model's body never trains, and only torch's one UserWarning says so. A gradient
is not there to see at the end (zero_grad() set it to None), but a stateful optimizer (Adam,
SGD with momentum) makes a parameter's state at its first step with a gradient: a trainable
parameter it holds with no state after it stepped never had one. An optimizer that keeps no
per-parameter state (plain SGD, LBFGS's one entry) tells nothing and is not judged.
"""
from __future__ import annotations

MAX_NAMES = 3


class ParametersWithoutGradients:
    name = "parameters_without_gradients"

    def __init__(self):
        self.session = None
        self._result: dict | None = None

    def install(self, session) -> None:
        self.session = session

    def remove(self) -> None:
        """The block ends: the optimizers still live, their state as the loop left it."""
        if self.session is None:
            return
        try:
            self._result = self._look(self.session.scope)
        except Exception:  # noqa: BLE001  (a recorder never breaks the user's code)
            self._result = None

    def record_nested(self, inner) -> dict | None:
        """The same look for a block nested in this one (a script's own under `memprof run`),
        its parameters named after its model."""
        try:
            return self._look(inner.scope if inner.scope.root_modules() else self.session.scope)
        except Exception:  # noqa: BLE001  (a recorder never breaks the user's code)
            return None

    def _look(self, scope) -> dict | None:
        names = scope.parameter_names()
        seen: set[int] = set()
        found, total, held = [], 0, 0
        for opt in self.session.steps.stepped():
            params = [p for g in opt.param_groups for p in g["params"]
                      if p.requires_grad and id(p) not in seen]
            if sum(1 for p in params if opt.state.get(p)) < 2:   # no per-parameter state
                continue
            for p in params:
                seen.add(id(p))
                nbytes = p.numel() * p.element_size()
                held += nbytes
                if not opt.state.get(p):
                    found.append(names.get(id(p), f"a {tuple(p.shape)} parameter"))
                    total += nbytes
        if not found:
            return None
        return {"parameters": len(found), "bytes": int(total), "names": found[:MAX_NAMES],
                "held_bytes": int(held)}

    def record(self) -> dict | None:
        return self._result
