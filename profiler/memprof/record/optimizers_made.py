"""The optimizers a script makes while a block records. Under `memprof run` (no optimizer
given) the health recorder learns the loop's optimizer at its first step, so the first step's
micro-steps read no LR and the rules that read the LR per micro-step started at step 2. Every
optimizer runs torch.optim.Optimizer.__init__ once: noted there, no per-step cost. Noted by
id, each entry dropped as its optimizer is freed: a script that makes one per iteration (MAML
inner loops) costs O(1) each, where a scan of every one noted before grew quadratically."""
from __future__ import annotations

import functools
import weakref

import torch


class OptimizersMade:
    def __init__(self, known=()):
        # weakly: a script that replaces its optimizer frees the old one, as without memprof
        self._refs: dict[int, weakref.ref] = {}   # id -> ref, in the order made
        for o in known:
            if o is not None:
                self.add(o)

    def install(self, patches) -> None:
        patches.patch(torch.optim.Optimizer, "__init__", self._wrap_init)

    def _wrap_init(self, original):
        made = weakref.ref(self)   # (the wrapper, left in a subclass's cache, keeps no session;
        #                             once health drops this table, the wrapper passes through)

        @functools.wraps(original)
        def __init__(optimizer, *args, **kwargs):
            original(optimizer, *args, **kwargs)
            watch = made()
            if watch is not None:
                watch.add(optimizer)
        return __init__

    def add(self, optimizer) -> None:
        key = id(optimizer)
        ref = self._refs.get(key)
        if ref is not None and ref() is optimizer:
            return
        self._refs.pop(key, None)   # (a freed one's id reused: the new one goes last)
        table = weakref.ref(self)   # (the callback keeps no table alive)

        def gone(dead, key=key):
            watch = table()
            if watch is not None and watch._refs.get(key) is dead:   # not a newer one's
                del watch._refs[key]
        self._refs[key] = weakref.ref(optimizer, gone)

    def alive(self) -> list:
        """Those made (or known) still alive, in the order made."""
        return [o for o in (r() for r in list(self._refs.values())) if o is not None]
