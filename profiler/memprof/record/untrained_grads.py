"""Gradients of parameters that no optimizer updates, as the block ends.

A LoRA base left with requires_grad=True (the optimizer given only the adapters) computes a
gradient of every base weight - as large as the model - that nothing reads, and the
optimizers' zero_grad() never frees it. Which parameters the optimizers update is noted by
the step clock when each first steps (record.steps: no hook of this recorder runs per step)
and read again at the end, for groups added later; the model's parameters that hold a
gradient and are in none of them are what this records, for `analyse.untrained_grads`.
"""
from __future__ import annotations

from .snapshots import storage_key

MAX_NAMES = 3


class UntrainedGradients:
    name = "untrained_gradients"

    def __init__(self):
        self.session = None
        self._result: dict | None = None

    def install(self, session) -> None:
        self.session = session

    def remove(self) -> None:
        """The block ends: the model still lives, its gradients as the loop left them."""
        if self.session is None:
            return
        try:
            self._result = self._look(self.session.scope)
        except Exception:  # noqa: BLE001  (a recorder never breaks the user's code)
            self._result = None

    def record_nested(self, inner) -> dict | None:
        """What a block nested in this one (a script's own under `memprof run`) records as it
        ends: the same look, over its model (this block's answer comes only at its own end;
        this block's step clock saw the optimizers step)."""
        try:
            scope = inner.scope if inner.scope.root_modules() else self.session.scope
            return self._look(scope)
        except Exception:  # noqa: BLE001  (a recorder never breaks the user's code)
            return None

    def _look(self, scope) -> dict | None:
        steps = self.session.steps
        if not steps.updated:    # no optimizer stepped: a manual update is not ours to judge
            return None
        trained = set(steps.updated)
        for opt in steps.stepped():   # (param groups added after the first step)
            trained.update(id(p) for g in opt.param_groups for p in g["params"])
        seen: set[int] = set()          # parameters counted
        storages: set[int] = set()      # gradient storages counted (a shared one once)
        found, total = [], 0
        for m in scope.root_modules():
            prefix = scope.root_label(m)
            for n, p in m.named_parameters(remove_duplicate=True):
                # (a non-leaf's .grad is never filled, and reading it warns)
                if not p.is_leaf or id(p) in trained or id(p) in seen or p.grad is None:
                    continue
                seen.add(id(p))
                found.append(f"{prefix}.{n}" if prefix else n)
                key = storage_key(p.grad)   # (address, bytes, device); None: not plain
                if key is not None and key[0] not in storages:
                    storages.add(key[0])
                    total += key[1]
        if not found:
            return None
        return {"parameters": len(found), "bytes": int(total), "names": found[:MAX_NAMES],
                "trained_parameters": len(trained)}

    def record(self) -> dict | None:
        return self._result

