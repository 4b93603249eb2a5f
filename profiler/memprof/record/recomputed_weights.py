"""Weights a module's forward pre-hook recomputes from its parameters at each forward and
keeps as a plain attribute until the next one: old-style `torch.nn.utils.weight_norm` and
`torch.nn.utils.spectral_norm` (deprecated, still in many vocoder and seq2seq codebases).
Such a weight keeps the graph of the forward that made it: a module not called in the
last step holds an earlier step's graph by design - one per module, never growing - which
the leak checks must not read as a retained graph. Nor is it an activation: the snapshots
name it `recomputed_weights` (RecomputingModules), memory the batch does not change. The
new-style `torch.nn.utils.parametrizations` compute the weight on access and keep nothing."""
from __future__ import annotations

import weakref

import torch
from torch.nn.utils import parametrize

from ..weight_recomputation import PARAMETRIZATIONS


def is_recomputing_hook(hook) -> bool:
    """A forward pre-hook that sets `module.<name>` from `compute_weight(module)`: torch's
    WeightNorm and SpectralNorm, or a codebase's copy of them."""
    return isinstance(getattr(hook, "name", None), str) and \
        callable(getattr(hook, "compute_weight", None))


def _modules(obj):
    """(path, module) under a root: a model, or a container of models (a GAN's [G, D])."""
    if isinstance(obj, torch.nn.Module):
        yield from ((f".{n}" if n else "", m) for n, m in obj.named_modules())
    elif isinstance(obj, (list, tuple, dict)):
        for k, m in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            if isinstance(m, torch.nn.Module):
                yield from ((f"[{k!r}]" + (f".{n}" if n else ""), s)
                            for n, s in m.named_modules())


def recomputed_weights(roots) -> dict[int, str]:
    """id(tensor) -> 'model.aux.weight' for each weight with a graph that such a hook keeps
    on a module the named roots ((name, object) pairs: the model, or auto mode's root
    modules) reach."""
    out: dict[int, str] = {}
    seen: set[int] = set()
    for root, obj in roots:
        for path, module in _modules(obj):
            if id(module) in seen:
                continue
            seen.add(id(module))
            for hook in module._forward_pre_hooks.values():
                if is_recomputing_hook(hook):
                    weight = module.__dict__.get(hook.name)   # a plain attribute
                    if isinstance(weight, torch.Tensor) and weight.grad_fn is not None:
                        out[id(weight)] = f"{root}{path}.{hook.name}"
    return out


def parametrization_lists(scope) -> list[list[int]]:
    """[list id, parametrized module id] for each of torch's ParametrizationLists among the
    modules `scope` named: those noted when named (ParametrizationOwners: a model freed
    before the block's end, `memprof run`'s main() returned, is gone by then) and those
    alive at the end (a parametrization registered on a module named earlier). Found by type,
    so a module of the user's own named `parametrizations` is none
    (weight_recomputation.scope_owners)."""
    out = [list(pair) for pair in scope.parametrizations.pairs]
    seen = set(scope.parametrizations.pairs)
    for module, mid in scope.module_ids():
        if parametrize.is_parametrized(module):
            for plist in module.parametrizations.values():
                lid = scope.module_id(plist)
                if lid is not None and isinstance(plist, parametrize.ParametrizationList) \
                        and (lid, mid) not in seen:
                    seen.add((lid, mid))
                    out.append([lid, mid])
    return out


class ParametrizationOwners:
    """(list id, parametrized module id) pairs noted as ModuleScope names modules (once per
    new module, never per call), so that they outlive the modules."""

    def __init__(self, forget):
        self.pairs: dict[tuple[int, int], None] = {}   # ordered, each once
        self._owner: dict[int, int] = {}   # id(list) -> its module's id, the list unnamed yet
        self._forget = forget              # ModuleScope._forget_when_freed

    def note(self, module: torch.nn.Module, mid: int, ids: dict[int, int]) -> None:
        """`module` was named `mid` (ids: id(module) -> module id, the scope's)."""
        if isinstance(module, parametrize.ParametrizationList):
            owner = self._owner.pop(id(module), None)
            if owner is not None:
                self.pairs[(mid, owner)] = None
            return
        modules = module._modules   # a dict (a ScriptModule's is not: none parametrized)
        plists = modules.get(PARAMETRIZATIONS) if isinstance(modules, dict) else None
        if not isinstance(plists, torch.nn.ModuleDict):
            return
        for plist in plists.values():
            if isinstance(plist, parametrize.ParametrizationList):
                lid = ids.get(id(plist))
                if lid is not None:
                    self.pairs[(lid, mid)] = None
                else:   # named next (named_modules: a module before its children)
                    self._owner[id(plist)] = mid
                    self._forget(plist, self._owner)


class RecomputingModules:
    """The named modules with such a hook, found again only when modules were named since
    (read at every step end: for a model without one, `any` is the whole cost, inline)."""

    def __init__(self):
        self.naming = None   # the scope's naming() when `any` was last found
        self.any = False     # some named module has such a hook
        self._modules: list[tuple[weakref.ref, int]] = []   # (module, its id in the scope)

    def find(self, scope, naming) -> None:
        """Looks again at the modules named (naming: scope.naming(), read by the caller)."""
        self.naming = naming
        self._modules = [(weakref.ref(m), mid) for m, mid in scope.module_ids()
                         if any(map(is_recomputing_hook, m._forward_pre_hooks.values()))]
        self.any = bool(self._modules)

    def look(self, scope) -> None:
        """Finds the modules again where modules were named since (off the per-step path;
        the step end compares the naming inline)."""
        naming = scope.naming()
        if naming != self.naming:
            self.find(scope, naming)

    def weights(self) -> tuple[list[torch.Tensor], list[int]]:
        """(the weights the modules last found keep now, the id of the module keeping
        each); the caller finds them again when modules were named since."""
        tensors, owners = [], []
        for ref, mid in self._modules:
            module = ref()
            for hook in (module._forward_pre_hooks.values() if module is not None else ()):
                weight = module.__dict__.get(hook.name) if is_recomputing_hook(hook) else None
                if isinstance(weight, torch.Tensor):
                    tensors.append(weight)
                    owners.append(mid)
        return tensors, owners
