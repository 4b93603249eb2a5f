"""How auto mode names root modules (the outermost modules called, what `memprof run` sees):
the first root's names without a prefix, the others' after what the calling code names them
(`D`, `criterion`), the first root's too once another root has parameters (a GAN's `G` and
`D`); and side roots, models first called on a thread whose calls are no passes (a second
model trained on a thread of its own, a model evaluated beside the training), named after
their own names, never first, held weakly. Roots are held weakly too: `memprof run` of a
k-fold or sweep loop that builds a model per fold keeps none of them alive (a list of roots
did: every fold's weights and gradients stayed, the peak grew by a model per fold, where
python freed each); a freed root keeps its names and its place, so the next fold's model is
`model_2` beside it, as while it lived. A mixin of record.scope.ModuleScope, whose state
(names, ids, roots) it reads and extends.
"""
from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass

import torch

from .holders import container_in_frame, loop_frame, name_in_frame
from .pass_thread import outermost_module_call

COMPILE_WRAPPER = "_orig_mod"   # torch.compile's OptimizedModule holds the model under this
#: models named on threads whose calls are no passes (side roots), at most, in a block: a loop
#: that evaluates a new copy of its model every epoch names its first copies only
MAX_SIDE_ROOTS = 16


def class_name(module: torch.nn.Module) -> str:
    """The user's class, also behind torch.compile's wrapper."""
    return type(getattr(module, COMPILE_WRAPPER, module)).__name__


def _unique(base: str, taken: set) -> str:
    """`base`, or `base_2`, `base_3`, ... : the first not taken."""
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def clean_name(name: str) -> str:
    """A module's path without torch.compile's wrapper level (`_orig_mod.layers.3` ->
    `layers.3`): the names the user wrote."""
    return ".".join(p for p in name.split(".") if p != COMPILE_WRAPPER)


@dataclass(eq=False)
class RootSlot:
    """A root as named: what its names need once the module is freed."""
    ref: weakref.ref
    prefix: str          # its names' prefix ("" for the first root)
    cls: str             # class_name(module)
    weights: bool        # it had parameters (read live while it lives: lazy modules)

    @classmethod
    def of(cls, module: torch.nn.Module, prefix: str) -> "RootSlot":
        return cls(weakref.ref(module), prefix, class_name(module), _has_weights(module))

    def has_weights(self) -> bool:
        module = self.ref()
        return self.weights if module is None else _has_weights(module)


def _has_weights(module: torch.nn.Module) -> bool:
    return next(module.parameters(), None) is not None


class RootNaming:
    """Root naming for ModuleScope (see the module docstring)."""

    @property
    def roots(self) -> list[torch.nn.Module]:
        """The roots still alive, in order (the first root first while it lives)."""
        return [m for m in (s.ref() for s in self._roots) if m is not None]

    def _side_roots(self) -> list[torch.nn.Module]:
        """The side roots still alive (_add_side_root)."""
        return [m for m in (r() for r in list(self._side.values())) if m is not None]

    def root_label(self, root: torch.nn.Module) -> str:
        """What a root's names start with: nothing for the model, or the first root seen; the
        others' own names (_root_prefix), and the first root's too once another root has
        parameters (a GAN's `G` and `D`, a teacher and its student)."""
        if self.model is not None:
            return ""
        for i, slot in enumerate(self._roots):
            if slot.ref() is root:
                return self._first_label() if i == 0 else slot.prefix
        return self._root_prefixes.get(id(root), "")   # a side root

    def _first_label(self) -> str:
        """The first root's label (root_label), also once it is freed."""
        first = self._roots[0]
        if len(self._roots) < 2 and not self._side:
            return first.prefix
        if not any(s.has_weights() for s in self._roots[1:]) and \
                not any(self._trained(r) for r in self._side_roots()):
            return ""   # beside a loss module (`criterion`): still the one model
        # unique also when this root came last and took in the first one (the others'
        # prefixes kept clear of the earlier first root's name only)
        others = {s.prefix for s in self._roots[1:]}
        return _unique(self._first_root_name or first.cls, others | self._side_prefixes)

    def _trained(self, side_root: torch.nn.Module) -> bool:
        """Whether a side root makes the first root's names take its label, as a GAN's D
        beside its G does: only one that was trained (a second model trained on a thread of
        its own), not a model evaluated on a background thread beside the training."""
        return any(id(p) in self._steps.trained for p in side_root.parameters())

    def named_roots(self) -> list[tuple[str, torch.nn.Module]]:
        """(name, module) per root that ran and is alive (auto mode): the first as the code
        called it (`model`), the others under their prefixes: where holder names start in auto
        mode (`memprof run`, whose block memprof enters from its own frame)."""
        out = []
        for i, slot in enumerate(self._roots):
            root = slot.ref()
            if root is not None:
                out.append(((self._first_root_name if i == 0 else slot.prefix) or slot.cls,
                            root))
        return out

    def first_root_class(self) -> str | None:
        """The class of the first root named, also once it is freed."""
        return self._roots[0].cls if self._roots else None

    def final_names(self) -> list[str]:
        """Module names for the profile: the first root's under its label (root_label) once
        several roots ran - they were named before a second one was seen."""
        label = self._first_label() if self._roots else ""
        if not label:
            return list(self.names)
        others = tuple(s.prefix for s in self._roots[1:] if s.prefix)
        others += tuple(self._side_prefixes) + self.beside_labels()
        return [n if n in others or n.startswith(tuple(o + "." for o in others))
                else f"{label}.{n}" if n else label for n in self.names]

    def _other_thread_root(self, module) -> int | None:
        """The id of a model first called on a thread whose calls are no passes (a second
        model trained on a thread of its own after the first trained on the block's; two
        models on two threads at once; a model evaluated beside the training), named as a
        side root (_add_side_root), its calls in its scope and nothing else. None for a call
        inside another module's; of a module without trainable leaf parameters (a transform
        in a data-loading thread; DataParallel's per-step replicas, whose parameters are
        copies made by autograd); of a wrapper holding the model (its model's calls are in
        their own scope); past MAX_SIDE_ROOTS. Such a model was not named: its layers'
        memory read "outside modules" and its weights "other"."""
        if id(module) in self._not_side:
            return None
        if self._side_named >= MAX_SIDE_ROOTS or \
                not any(p.requires_grad and p.is_leaf for p in module.parameters()) or \
                any(m is r for m in module.modules() for r in self.roots):
            self._not_side[id(module)] = True
            self._forget_when_freed(module, self._not_side)
            return None
        if not outermost_module_call():
            return None
        with self._naming_lock:
            if id(module) not in self._auto_ids:
                self._add_side_root(module)
            return self._auto_ids.get(id(module))

    def _add_side_root(self, module: torch.nn.Module) -> None:
        """Names a side root's modules under its own name (`_root_prefix`: `model_2`,
        `evaluated`), never as the first root, and holds it weakly (a copy evaluated once is
        freed as without memprof); side roots inside it are renamed under it."""
        inside = {id(m) for m in module.modules()}
        rename = {id(m) for r in self._take_side_roots(inside) for m in r.modules()}
        prefix = self._root_prefix(module)
        self._side_prefixes.add(prefix)
        self._root_prefixes[id(module)] = prefix
        self._name_tree(module, prefix, rename)
        key = id(module)
        self._side[key] = weakref.ref(module, lambda _ref, side=self._side: side.pop(key, None))
        self._side_named += 1

    def _take_side_roots(self, inside: set[int]) -> list[torch.nn.Module]:
        """The side roots among `inside` (ids of a new root's modules), no longer side roots:
        the new root takes them in, renamed under it."""
        taken = [self._side.pop(k)() for k in [k for k in self._side if k in inside]]
        return [r for r in taken if r is not None]

    def _promote(self, module) -> None:
        """A side root called as the outermost module on the passes' thread (the model a
        background evaluation called before its training began): a root as any other, and
        while no root leads, the first - its names without a prefix, as if the training had
        called it first."""
        if self._side.pop(id(module), None) is None:
            return
        if self._roots:
            self._roots.append(RootSlot.of(module, self._root_prefixes.get(id(module), "")))
            return
        self._side_prefixes.discard(self._root_prefixes.pop(id(module), ""))
        self._first_root_name = self._calling_name(module)
        self._name_tree(module, "", {id(m) for m in module.modules()})
        self._roots.insert(0, RootSlot.of(module, ""))

    def _add_root(self, module: torch.nn.Module) -> None:
        """A new outermost module; earlier roots inside it become its submodules, renamed
        (side roots too: a model's encoder a background thread called alone). A module the
        calling code holds inside a model of its own (`model[0](x)`) makes that model the root:
        its layers were roots of their own, named `Linear`, `Linear_2`, the title `Linear`."""
        holder = self._calling_container(module)
        if holder is not None and id(holder) not in self._auto_ids:
            module = holder
        inside = {id(m) for m in module.modules()}
        live = [(slot, slot.ref()) for slot in self._roots]
        absorbed = [m for _, m in live if m is not None and id(m) in inside] + \
            self._take_side_roots(inside)
        rename = {id(m) for r in absorbed for m in r.modules()}
        first = bool(live) and live[0][1] is not None and id(live[0][1]) in inside
        # (a freed root keeps its slot: its names stay taken, the next model is `model_2`)
        self._roots = [slot for slot, m in live if m is None or id(m) not in inside]
        if self._roots and not first:
            prefix = self._root_prefix(module)
        else:
            prefix, self._first_root_name = "", self._calling_name(module)
        self._name_tree(module, prefix, rename)
        self._roots.insert(0 if first or not self._roots else len(self._roots),
                           RootSlot.of(module, prefix))

    def _root_prefix(self, module: torch.nn.Module) -> str:
        """The prefix of a root's names after the first root's (whose names have none): what
        the calling code names it (`D` for `D(fake)`, `criterion`), else its class, made
        unique - a GAN's two `Sequential`s read as one model before (`Sequential.0` for both
        first layers, their memory summed)."""
        beside = self.beside_prefix(module)
        if beside is not None:   # named beside the model before it was called: its names
            return beside
        base = clean_name(self._calling_name(module) or "") or class_name(module)
        # taken: every root's first path part, and the first root's name and class (its
        # label once this root is added: root_label)
        taken = {n.split(".")[0] for n in self.names}
        if self._roots:
            taken.update({self._roots[0].cls, self._first_root_name})
        return _unique(base, taken)

    @staticmethod
    def _calling_container(module: torch.nn.Module) -> torch.nn.Module | None:
        """The model the innermost frame outside torch and memprof holds `module` in."""
        frame = loop_frame(sys._getframe(1))
        return container_in_frame(frame, module) if frame is not None else None

    @staticmethod
    def _calling_name(module: torch.nn.Module) -> str | None:
        """What the innermost frame outside torch and memprof calls `module` (holders)."""
        frame = loop_frame(sys._getframe(1))
        return name_in_frame(frame, module) if frame is not None else None
