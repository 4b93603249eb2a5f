"""Names for what the loop keeps beside the models memprof sees called (not_trained.Beside: an
EMA copy only updated, a teacher, diffusers' EMAModel's `shadow_params`): the path the loop's
frame gives it (`ema_model`, `self.ema`), its modules below it (`ema_model.module.fc1`).
Unnamed, their parameters' bytes had no owner ("outside modules" in every module table), next
to a "not trained" figure that said whose they were nowhere. Named as their parameters are
(ModuleScope.param_module), never as modules that run: a call of one is no pass, and in auto
mode one called later becomes a root under the same names. A mixin of
record.scope.ModuleScope, whose names and parameter owners it extends.
"""
from __future__ import annotations

import torch

from .root_names import clean_name


class BesideNaming:
    """Beside naming for ModuleScope (see the module docstring)."""

    def name_beside(self, name: str, module: torch.nn.Module) -> None:
        """Names `module` (a model beside, `name` its path in the loop's frame) and its
        submodules after it, and gives its parameters their modules; once per model."""
        if id(module) in self._beside_prefixes or id(module) in self._auto_ids:
            return
        prefix = self._free_prefix(name)
        self._beside_prefixes[id(module)] = prefix
        self._forget_when_freed(module, self._beside_prefixes)
        self._beside_labels.add(prefix)
        for sub_name, sub in module.named_modules(remove_duplicate=True):
            if id(sub) in self._auto_ids or id(sub) in self._beside_ids:
                continue   # (shared with a model named before: it keeps its name)
            mid = len(self.names)
            self.names.append(clean_name(".".join(x for x in (prefix, sub_name) if x)))
            self._beside_ids[id(sub)] = mid
            self._forget_when_freed(sub, self._beside_ids)
            self._own_parameters(sub.parameters(recurse=False), mid)

    def name_kept(self, name: str, tensors: list[torch.Tensor]) -> None:
        """Names a list of tensors beside the models (an EMA's copies of the parameters,
        `name` its path in the loop's frame: `ema.shadow_params`) as one holder of them."""
        mid = self._kept_ids.get(name)
        if mid is None:
            mid = self._kept_ids[name] = len(self.names)
            self.names.append(self._free_prefix(name))
            self._beside_labels.add(self.names[mid])
        self._own_parameters(tensors, mid)

    def _own_parameters(self, params, mid: int) -> None:
        for p in params:
            if id(p) not in self.param_module:
                self.param_module[id(p)] = mid
                self._forget_when_freed(p, self.param_module)

    def _free_prefix(self, name: str) -> str:
        """`name`, or `name_2`, ...: the first that no module named so far starts with."""
        taken = set(self.names)
        base, k, out = name, 2, name
        while out in taken or any(n.startswith(out + ".") for n in taken):
            out, k = f"{base}_{k}", k + 1
        return out

    def beside_prefix(self, module: torch.nn.Module) -> str | None:
        """The prefix a model beside was named under, if it was (a root it becomes keeps
        it)."""
        return self._beside_prefixes.get(id(module))

    def beside_labels(self) -> tuple[str, ...]:
        """The prefixes of what was named beside (also once freed): names no root label goes
        before."""
        return tuple(self._beside_labels)
