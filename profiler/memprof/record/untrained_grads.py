"""Gradients of parameters that no optimizer updates, as the block ends.

A LoRA base left with requires_grad=True (the optimizer given only the adapters) computes a
gradient of every base weight - as large as the model - that nothing reads, and the
optimizers' zero_grad() never frees it. Which parameters each optimizer updates is read when
it first steps (and again at the end, for groups added later); the model's parameters that
hold a gradient and are in none of them are what this records, for
`analyse.untrained_grads`.
"""
from __future__ import annotations

import weakref

from .snapshots import storage_key

MAX_NAMES = 3


class UntrainedGradients:
    name = "untrained_gradients"

    def __init__(self):
        self.session = None
        self._optimizers: dict[int, weakref.ref] = {}
        self._trained: set[int] = set()     # ids of the parameters some optimizer updates
        self._result: dict | None = None

    def install(self, session) -> None:
        self.session = session
        session.steps.on_optimizer_pre.append(self._pre)

    def _pre(self, optimizer) -> None:
        seen = self._optimizers.get(id(optimizer))
        if seen is None or seen() is not optimizer:   # new (or a new one at a freed one's id)
            self._optimizers[id(optimizer)] = weakref.ref(optimizer)
            self._note(optimizer)

    def _note(self, optimizer) -> None:
        self._trained.update(id(p) for g in optimizer.param_groups for p in g["params"])

    def remove(self) -> None:
        """The block ends: the model still lives, its gradients as the loop left them."""
        if self.session is None:
            return
        try:
            self._pre_removed()
            self._result = self._look(self.session.scope)
        except Exception:  # noqa: BLE001  (a recorder never breaks the user's code)
            self._result = None

    def _pre_removed(self) -> None:
        if self._pre in self.session.steps.on_optimizer_pre:
            self.session.steps.on_optimizer_pre.remove(self._pre)

    def record_nested(self, inner) -> dict | None:
        """What a block nested in this one (a script's own under `memprof run`) records as it
        ends: the same look, over its model (this block's answer comes only at its own end)."""
        try:
            scope = inner.scope if inner.scope.root_modules() else self.session.scope
            return self._look(scope)
        except Exception:  # noqa: BLE001  (a recorder never breaks the user's code)
            return None

    def _look(self, scope) -> dict | None:
        if not self._optimizers:    # no optimizer stepped: a manual update is not ours to judge
            return None
        for ref in self._optimizers.values():
            opt = ref()
            if opt is not None:
                self._note(opt)
        seen: set[int] = set()          # parameters counted
        storages: set[int] = set()      # gradient storages counted (a shared one once)
        found, total = [], 0
        for m in scope.root_modules():
            prefix = scope.root_label(m)
            for n, p in m.named_parameters(remove_duplicate=True):
                if id(p) in self._trained or id(p) in seen or p.grad is None:
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
                "trained_parameters": len(self._trained)}

    def record(self) -> dict | None:
        return self._result

