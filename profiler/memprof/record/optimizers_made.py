"""The optimizers a script makes while a block records. Under `memprof run` (no optimizer
given) the health recorder learns the loop's optimizer at its first step, so the first step's
micro-steps read no LR and the rules that read the LR per micro-step started at step 2. Every
optimizer runs torch.optim.Optimizer.__init__ once: noted there, no per-step cost."""
from __future__ import annotations

import functools
import weakref

import torch


class OptimizersMade:
    def __init__(self, known=()):
        # weakly: a script that replaces its optimizer frees the old one, as without memprof
        self._refs = [weakref.ref(o) for o in known if o is not None]

    def install(self, patches) -> None:
        patches.patch(torch.optim.Optimizer, "__init__", self._wrap_init)

    def _wrap_init(self, original):
        made = weakref.ref(self)   # (the wrapper, left in a subclass's cache, keeps no session)

        @functools.wraps(original)
        def __init__(optimizer, *args, **kwargs):
            original(optimizer, *args, **kwargs)
            watch = made()
            if watch is not None:
                watch.add(optimizer)
        return __init__

    def add(self, optimizer) -> None:
        if not any(r() is optimizer for r in self._refs):
            self._refs.append(weakref.ref(optimizer))

    def alive(self) -> list:
        """Those made (or known) still alive, in the order made."""
        return [o for o in (r() for r in self._refs) if o is not None]
