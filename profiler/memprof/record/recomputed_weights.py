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
    modules `scope` named (read once, at the block's end): found by type, so a module of the
    user's own named `parametrizations` is none (weight_recomputation.scope_owners)."""
    out = []
    for module, mid in scope.module_ids():
        if parametrize.is_parametrized(module):
            for plist in module.parametrizations.values():
                lid = scope.module_id(plist)
                if lid is not None and isinstance(plist, parametrize.ParametrizationList):
                    out.append([lid, mid])
    return out


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
