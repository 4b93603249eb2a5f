"""Parameters an optimizer updates that never got a gradient, looked at while it lives.

A block run under `checkpoint(block, x, use_reentrant=True)` whose input needs no gradient
(raw features, the output of a frozen embedding) passes none to its weights: the optimizer
steps, the model's body never trains, and only torch's one UserWarning says so. A gradient
is not there to see at the end (zero_grad() set it to None), but a stateful optimizer (Adam,
SGD with momentum) makes a parameter's state at its first step with a gradient: a trainable
parameter it holds with no state after it stepped never had one. An optimizer that keeps no
per-parameter state (plain SGD, LBFGS's one entry) tells nothing and is not judged; nor is
ZeroRedundancyOptimizer, whose local optimizer holds the state of this rank's shard (judged,
its parameters only: the others are other ranks'). A parameter's bytes are this rank's (an
FSDP2 DTensor's local shard). It looks at a few step ends and as the block ends
(record.live_look: a loop in main() under `memprof run` has freed the optimizer by then),
and says how many steps it judged.
"""
from __future__ import annotations

from .live_look import LiveLook
from .snapshots import local_nbytes

MAX_NAMES = 3


class ParametersWithoutGradients(LiveLook):
    name = "parameters_without_gradients"

    def __init__(self):
        super().__init__()
        # what the latest look that found some named: id -> (name, bytes), and the bytes the
        # optimizers held then
        self._found: dict[int, tuple[str, int]] = {}
        self._held = 0
        # a hook on each parameter found, until it gets a gradient (one call, then removed):
        # a look's finding kept after the loop freed the optimizer leaves out what trained
        # after it (an expert of a mixture that got its first tokens at step 5 of 6)
        self._watches: dict[int, object] = {}
        self._late: set[int] = set()

    def _look(self, scope) -> dict | None:
        names = scope.parameter_names()
        seen: set[int] = set()
        found, held = [], 0
        for opt in self.session.steps.holders():
            params = [p for g in opt.param_groups for p in g["params"]
                      if p.requires_grad and id(p) not in seen]
            if not _per_parameter_state(opt, params):
                continue
            for p in params:
                seen.add(id(p))
                nbytes = local_nbytes(p)
                held += nbytes
                if not opt.state.get(p):
                    found.append((p, nbytes))
                    self._watch(p)
        if not found:
            return None
        self._found = {id(p): (names.get(id(p), f"a {tuple(p.shape)} parameter"), nbytes)
                       for p, nbytes in found}
        self._held = held
        return self._summary()

    def _summary(self) -> dict | None:
        left = [v for k, v in self._found.items() if k not in self._late]
        if not left:
            return None
        return {"parameters": len(left), "bytes": int(sum(b for _, b in left)),
                "names": [n for n, _ in left[:MAX_NAMES]], "held_bytes": int(self._held)}

    def _watch(self, p) -> None:
        if id(p) in self._watches or not p.is_leaf:
            return

        def got_gradient(param, pid=id(p)):
            self._late.add(pid)
            handle = self._watches.pop(pid, None)
            if handle is not None:
                handle.remove()
        try:
            self._watches[id(p)] = p.register_post_accumulate_grad_hook(got_gradient)
        except RuntimeError:   # (a tensor that takes no hooks: judged at the looks alone)
            pass

    def remove(self) -> None:
        """As LiveLook's; a look's result kept from a step end (its optimizer freed since)
        leaves out what got a gradient after it."""
        super().remove()
        for handle in tuple(self._watches.values()):
            handle.remove()
        self._watches.clear()
        kept = self._result
        if kept is not None and "steps" in kept and self._late:
            left = self._summary()
            self._result = None if left is None else {**left, "steps": kept["steps"]}


def _per_parameter_state(opt, params) -> bool:
    """Whether `opt` keeps state per parameter: two parameters with state (LBFGS keeps one
    entry), or one whose state holds a tensor of its shape (the Adam state of a
    ZeroRedundancyOptimizer shard of a single parameter)."""
    with_state = [p for p in params if opt.state.get(p)]
    return len(with_state) >= 2 or any(
        getattr(v, "shape", None) == p.shape for p in with_state for v in opt.state[p].values())
