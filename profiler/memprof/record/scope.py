"""The one set of module hooks: which module is running (native scope stack), and when a
forward pass of the root module starts and ends.

Every recorder that cares about forward passes subscribes here instead of installing hooks of
its own: `on_forward_start(args, kwargs)` and `on_forward_end()` run once per real forward
pass of the root (not for the recomputation that activation checkpointing runs in backward).
With a model, its modules are named up front; without one (auto mode, what `memprof run`
uses) global module hooks name whatever modules run, the outermost one called being a root.
"""
from __future__ import annotations

import torch

from .. import _C
from .events import PHASE_FORWARD, PHASE_OTHER
from .patches import remove_handles


class ModuleScope:
    def __init__(self, model: torch.nn.Module | None, auto: bool, mark):
        self.model = model
        self.auto = auto and model is None
        self._mark = mark                         # mark(label): a marker in the event stream
        self.names: list[str] = []                # module id -> qualified name
        self.param_module: dict[int, int] = {}    # id(parameter) -> module id
        self.roots: list[torch.nn.Module] = []    # auto mode: root modules seen, in order
        self.before_forward: list = []            # fn(), before a real root forward starts
        self.on_forward_start: list = []
        self.on_forward_end: list = []
        self._auto_ids: dict[int, int] = {}
        self._stack: list[int] = []               # auto mode: running module ids
        self._in_forward = False
        self._handles: list = []
        if model is not None:
            self._name_tree(model, "")

    # ------------------------------------------------------------------ naming
    def _name_tree(self, root: torch.nn.Module, prefix: str) -> None:
        for name, sub in root.named_modules(remove_duplicate=True):
            if id(sub) in self._auto_ids:
                continue
            mid = len(self.names)
            self._auto_ids[id(sub)] = mid
            self.names.append(".".join(x for x in (prefix, name) if x))
            for p in sub.parameters(recurse=False):
                self.param_module.setdefault(id(p), mid)

    def root_modules(self) -> list[torch.nn.Module]:
        return [self.model] if self.model is not None else list(self.roots)

    def parameter_names(self) -> dict[int, str]:
        """id(parameter) -> qualified name, over the model or the roots seen so far."""
        out: dict[int, str] = {}
        for i, m in enumerate(self.root_modules()):
            prefix = f"{type(m).__name__}." if self.model is None and i else ""
            for n, q in m.named_parameters(remove_duplicate=True):
                out.setdefault(id(q), prefix + n)
        return out

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        if self.model is not None:
            for mid, (_, mod) in enumerate(self.model.named_modules(remove_duplicate=True)):
                if mid == 0:
                    self._handles.append(mod.register_forward_pre_hook(
                        self._root_pre, with_kwargs=True))
                    self._handles.append(mod.register_forward_hook(self._root_post,
                                                                   always_call=True))
                else:
                    self._handles.append(mod.register_forward_pre_hook(
                        lambda m, a, mid=mid: _C.push_module(mid)))
                    self._handles.append(mod.register_forward_hook(
                        lambda m, a, o: _C.pop_module(), always_call=True))
        elif self.auto:
            from torch.nn.modules.module import (register_module_forward_hook,
                                                 register_module_forward_pre_hook)
            self._handles.append(register_module_forward_pre_hook(self._auto_pre))
            self._handles.append(register_module_forward_hook(self._auto_post,
                                                              always_call=True))

    def remove(self) -> None:
        remove_handles(self._handles)

    # ------------------------------------------------------------------ root passes
    def _enter_root(self, mid: int, args, kwargs) -> None:
        real = not torch._C._current_autograd_node()   # not a recompute in backward
        if real:
            for fn in self.before_forward:
                fn()
            _C.set_phase(PHASE_FORWARD)
            self._mark("forward_start")
        _C.push_module(mid)
        if real:
            self._in_forward = True
            for fn in self.on_forward_start:
                fn(args, kwargs)

    def _exit_root(self) -> None:
        _C.pop_module()
        if _C.get_phase() == PHASE_FORWARD:
            _C.set_phase(PHASE_OTHER)
            self._mark("forward_end")
        if self._in_forward:
            self._in_forward = False
            for fn in self.on_forward_end:
                fn()

    def _root_pre(self, module, args, kwargs):
        self._enter_root(0, args, kwargs)

    def _root_post(self, module, args, output):
        self._exit_root()

    # ------------------------------------------------------------------ auto mode
    def _auto_pre(self, module, args) -> None:
        mid = self._auto_ids.get(id(module))
        if mid is None:
            if not self._stack:
                self._name_tree(module, type(module).__name__ if self.roots else "")
                self.roots.append(module)
            else:
                mid = len(self.names)
                self._auto_ids[id(module)] = mid
                self.names.append(f"{self.names[self._stack[-1]]}.<{type(module).__name__}>")
            mid = self._auto_ids[id(module)]
        root = not self._stack
        self._stack.append(mid)
        if root:
            self._enter_root(mid, args, None)
        else:
            _C.push_module(mid)

    def _auto_post(self, module, args, output) -> None:
        if self._stack:
            self._stack.pop()
            if self._stack:
                _C.pop_module()
            else:
                self._exit_root()
