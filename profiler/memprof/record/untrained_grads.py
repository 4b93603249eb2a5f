"""Gradients of parameters that no optimizer updates, looked at while the model lives.

A LoRA base left with requires_grad=True (the optimizer given only the adapters) computes a
gradient of every base weight - as large as the model - that nothing reads, and the
optimizers' zero_grad() never frees it. Which parameters the optimizers update is noted by
the step clock when each first steps (record.steps: no hook of this recorder runs per step)
and read again at each look, for groups added later; the model's parameters that hold a
gradient and are in none of them are what this records, for `analyse.untrained_grads`. It
looks at a few step ends and as the block ends (record.live_look: a loop in main() under
`memprof run` has freed the model by then).
"""
from __future__ import annotations

from .live_look import LiveLook
from .snapshots import local_nbytes, storage_key

MAX_NAMES = 3


class UntrainedGradients(LiveLook):
    name = "untrained_gradients"

    def _look(self, scope) -> dict | None:
        steps = self.session.steps
        if not steps.updated:    # no optimizer stepped: a manual update is not ours to judge
            return None
        trained = set(steps.updated)
        for opt in steps.stepped():   # (param groups added after the first step)
            trained.update(id(p) for g in opt.param_groups for p in g["params"])
        seen: set[int] = set()          # parameters counted
        storages: set[int] = set()      # gradient storages counted (a shared one once)
        found, total, model_bytes = [], 0, 0
        for m in scope.root_modules():
            prefix = scope.root_label(m)
            for n, p in m.named_parameters(remove_duplicate=True):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                model_bytes += local_nbytes(p)
                # (a non-leaf's .grad is never filled, and reading it warns)
                if not p.is_leaf or id(p) in trained or p.grad is None:
                    continue
                found.append(f"{prefix}.{n}" if prefix else n)
                key = storage_key(p.grad)   # (address, bytes, device); None: not plain
                if key is not None and key[0] not in storages:
                    storages.add(key[0])
                    total += key[1]
        if not found:
            return None
        return {"parameters": len(found), "bytes": int(total), "names": found[:MAX_NAMES],
                "trained_parameters": len(trained),
                # the share that makes it a warning, where the parameters are freed at the end
                "parameter_bytes": int(model_bytes)}

