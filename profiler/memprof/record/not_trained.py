"""Which parameters no optimizer trains though they change between steps: a model kept beside
the trained one and updated in place (an EMA copy: a deepcopy set to requires_grad_(False),
timm's ModelEmaV2, torch's AveragedModel), or such a part of the trained model (`model.ema`
next to `model.backbone`, an EMA codebook). Read by requires_grad they were frozen, as if part
of the model were (AveragedModel, which keeps requires_grad: trainable, the trainable bytes
doubled); they are the parameters' third part, Snapshot.trainable's NOT_TRAINED.

A model that is never called (only updated, as ModelEmaV2 and AveragedModel are between
evaluations) is no root module memprof names, and under `track(model, opt)` only the model
is: its memory read "other". So the frames of the block and of the training loop are looked
at (at the block's start and at steps 2, 4, 8, ...) for the models they hold beside the
session's (`Beside`), each by the path the frame gives it (`ema_model`, `self.ema`): its
modules are named after it (scope.name_beside), or their memory had no owner. An EMA kept as
a list of tensors, not as a module (diffusers' EMAModel's `shadow_params`, a list of cloned
parameters updated by `torch._foreach_lerp_`), is looked for there too: a list each of whose
tensors mirrors a trained parameter (shape and dtype), and only its tensors that changed
between looks are not trained - a list that mirrors them but stays (an L2-SP anchor), or one
that changes but mirrors none (metrics), is no EMA.

What tells a change: a parameter's version counter, and where that did not move (an update
through `.data`, whose tensor has a counter of its own) a sample of the parameter's bytes,
compared with the one taken when it was first seen (`Changes`). Both are read at the notes of
the parameters only (the first step, the look steps, the block's end), never at every step;
the sample only of frozen parameters that no optimizer updates (a run without any reads
none). A frozen model that is only called (a diffusion run's VAE, a probe's backbone, a LoRA
base) changes neither and stays frozen.
"""
from __future__ import annotations

import weakref

import torch

from .. import _C
from .holders import ATOMS, release_locals_snapshot

#: models beside the session's kept track of, at most (a loop that makes a new copy of its
#: model every epoch: its first copies only)
MAX_BESIDE = 16
#: tensors in a list beside looked at, at most (an EMA's copies: one per parameter tensor; a
#: longer list, a data set's samples kept in memory, is none)
MAX_KEPT = 4096
#: elements of a parameter compared between notes (spread over it: an EMA's update moves
#: nearly every element, a rounding-sized one most)
SAMPLE = 256


#: what a parameter storage is to the run (Snapshot.trainable's values)
FROZEN, TRAINS, NOT_TRAINED = 0, 1, 2
#: which reading a storage shared by parameters that read differently takes (tied weights, a
#: view of another parameter): the highest. One that trains makes it train (a LoRA base's
#: storage with an adapter's view into it), and the model's own frozen reading beats
#: NOT_TRAINED's (a part of the model that its EMA copy shares)
_PRECEDENCE = {TRAINS: 2, FROZEN: 1, NOT_TRAINED: 0}


def trainable_storages(params: list, ptrs: list,
                       untrained: set[int] | frozenset = frozenset()) -> dict[int, int]:
    """Storage address -> TRAINS where a parameter at it requires grad, FROZEN where none does
    (a LoRA base against its adapters), NOT_TRAINED where every parameter at it is in
    `untrained` (ids: not_trained.not_trained's); where parameters at one storage read
    differently, _PRECEDENCE says which reading it takes. `ptrs`: the parameters' storage
    addresses (snapshots.storage_ptrs)."""
    out: dict[int, int] = {}
    for ptr, p in zip(ptrs, params):
        if ptr is not None:
            role = NOT_TRAINED if id(p) in untrained else TRAINS if p.requires_grad else FROZEN
            was = out.get(ptr)
            out[ptr] = role if was is None else max(was, role, key=_PRECEDENCE.__getitem__)
    return out


def not_trained(roots: list, trained: set[int], changes: "Changes",
                kept: list[list] = ()) -> set[int]:
    """ids of the parameters of `roots` that no optimizer updates (`trained`: ids of those
    that one does, StepClock.updated) where one updates some root's, and that either belong
    to a root of which it updates none and are left requiring grad (an AveragedModel), or
    are frozen and changed since first seen (`changes`): in a model beside, or in the
    trained one (its `self.ema`); and the tensors of `kept` (lists beside, Beside.kept) that
    changed, of lists whose every tensor mirrors a trained parameter. Empty without an
    optimizer's parameters to go by (a hand-written update: requires_grad is all there is)."""
    groups = [list(m.parameters()) for m in roots]
    is_trained = [any(id(p) in trained for p in g) for g in groups]
    if not any(is_trained):
        return set()
    frozen = mirroring(kept, [p for g in groups for p in g if id(p) in trained])
    out = set()
    for group, root_trains in zip(groups, is_trained):
        # in the trained model, only a frozen parameter shaped like one it trains (its
        # `self.ema` mirrors them): a LoRA base merged and unmerged in place for a
        # generation engine, a frozen Embedding(max_norm=...) renormalised, stay frozen
        mirrors = {tuple(p.shape) for p in group if id(p) in trained} if root_trains else None
        for p in group:
            if id(p) in trained:
                continue
            if not p.requires_grad:
                if mirrors is None or tuple(p.shape) in mirrors:
                    frozen.append(p)
            elif not root_trains:
                out.add(id(p))
            # (a trained model's parameter left out of its optimizer: requires_grad says)
    return out | changes.changed(frozen)


def mirroring(kept: list[list], params: list) -> list:
    """The tensors of the lists in `kept` each of whose tensors is shaped like one of
    `params` (the trained parameters), of their dtype, and requires no grad: an EMA's copies
    of them, once they change. A list longer than the parameters mirrors nothing."""
    if not kept or not params:
        return []
    mirrors = {(tuple(p.shape), p.dtype) for p in params}
    grads = {id(p.grad) for p in params if p.grad is not None}   # (a list of the gradients)
    return [t for tensors in kept if len(tensors) <= len(params) and all(
        not t.requires_grad and id(t) not in grads and (tuple(t.shape), t.dtype) in mirrors
        for t in tensors) for t in tensors]


class Changes:
    """Whether parameters changed since first seen here: their version counters, else a
    sample of their bytes (see the module docstring). A change, once seen, stands."""

    def __init__(self):
        # id(parameter) -> (weak reference, version, storage address, sample bytes or None)
        self._first: dict[int, tuple] = {}
        self._changed: set[int] = set()

    def changed(self, params: list) -> set[int]:
        """ids of `params` that changed since each was first passed here."""
        new, compare = [], []
        for p in params:
            first = self._first.get(id(p))
            if first is None or first[0]() is not p or first[2] != _address(p):
                new.append(p)   # (a parameter moved, or a new one at a freed one's id)
            elif id(p) not in self._changed:
                if first[1] is not None and _version(p) != first[1]:
                    self._changed.add(id(p))
                elif first[3] is not None:
                    compare.append(p)
        for p, sample in zip(new, _samples(new)):
            self._changed.discard(id(p))
            self._first[id(p)] = (weakref.ref(p), _version(p), _address(p), sample)
        for p, sample in zip(compare, _samples(compare)):
            if sample != self._first[id(p)][3]:
                self._changed.add(id(p))
        return {id(p) for p in params if id(p) in self._changed}


def _version(p) -> int | None:
    """The version counter; None for an inference tensor, which has none (reading it raises:
    a frozen encoder made under torch.inference_mode) - its bytes are compared instead."""
    return None if p.is_inference() else p._version


def _plain(p) -> bool:
    """A parameter with bytes to read here (not fake, meta, sharded or functionalized)."""
    return type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type != "meta" and \
        not torch._is_functional_tensor(p)


def _address(p) -> int | None:
    return p.data_ptr() if _plain(p) else None


def _samples(params: list) -> list[bytes | None]:
    """SAMPLE elements spread over each parameter, as bytes; None where there are none to
    read (a fake or sharded tensor, not contiguous, a layout that refuses: its version counter
    is all there is). One view per parameter and one copy to the host per device and dtype."""
    groups: dict[tuple, list] = {}
    out: list[bytes | None] = [None] * len(params)
    if torch._C._len_torch_dispatch_stack():
        return out   # a dispatch mode is on (an estimate's fake tensors): no bytes to read
    with torch.no_grad():   # (views of frozen parameters: no autograd record)
        for i, p in enumerate(params):
            if _plain(p) and p.is_contiguous() and p.numel():
                step = max(1, p.numel() // SAMPLE)
                try:
                    picked = p.as_strided((min(SAMPLE, -(-p.numel() // step)),), (step,))
                except Exception:  # noqa: BLE001  (a quantized or other odd tensor)
                    continue
                groups.setdefault((p.device, p.dtype), []).append((i, picked))
        for pieces in groups.values():
            try:
                data = torch.cat([t for _, t in pieces]).cpu().view(torch.uint8)
            except Exception:  # noqa: BLE001  (as above: the version counters stand)
                continue
            if type(data) is not torch.Tensor:   # (a function mode's fake result)
                continue
            data, at = data.numpy().tobytes(), 0
            for i, t in pieces:
                n = t.numel() * t.element_size()
                out[i] = data[at:at + n]
                at += n
    return out


class Beside:
    """Models held by the block's or the training loop's frame beside the session's (whose
    parameters it already notes), and lists of tensors they hold (an EMA's copies), each
    with the path the frame gives it; held weakly (see the module docstring)."""

    def __init__(self):
        self._models: dict[int, weakref.ref] = {}
        self._names: dict[int, str] = {}           # id(model) -> its path in the frame
        self._kept: dict[str, list[weakref.ref]] = {}   # path -> its tensors

    def models(self) -> list[torch.nn.Module]:
        """The models found, still alive."""
        return [m for m in (r() for r in list(self._models.values())) if m is not None]

    def named(self) -> list[tuple[str, torch.nn.Module]]:
        """(path in the frame, model) of the models found, still alive."""
        return [(self._names[id(m)], m) for m in self.models()]

    def kept(self) -> dict[str, list[torch.Tensor]]:
        """path in the frame -> the tensors still alive of a list of tensors found."""
        return {name: [t for t in (r() for r in refs) if t is not None]
                for name, refs in list(self._kept.items())}

    def look(self, frames: list, own: list) -> bool:
        """Take in the models with parameters that `frames` hold (a variable, or an
        attribute of one: a trainer's `self.ema`, a wrapper's `.module`) none of whose
        parameters is one of `own` (the session's) or a model found before, and the lists of
        tensors none of which is that mirror `own`'s trainable ones (`mirroring`): a list
        that is no EMA (losses, a batch) takes none of the MAX_BESIDE slots, or an EMA made
        later was never looked after; whether a model was new. Walked with the thread's
        tracer suspended, as the leak walks are: under a script's coverage tool or debugger
        each line of it was the tracer's event."""
        with _C.untraced():
            return self._look(frames, own)

    def _look(self, frames: list, own: list) -> bool:
        trained = [p for p in own if p.requires_grad]
        known = {id(p) for p in own} | {id(p) for m in self.models() for p in m.parameters()}
        found = False
        modules, lists = _held(frames)
        for name, module in modules:
            if len(self._models) >= MAX_BESIDE:
                break
            params = [id(p) for p in module.parameters()]
            if params and id(module) not in self._models and known.isdisjoint(params):
                self._models[id(module)] = weakref.ref(module, self._forget(id(module)))
                self._names[id(module)] = name
                known.update(params)
                found = True
        for name, tensors in lists:
            if name in self._kept or len(self._kept) < MAX_BESIDE:
                if mirroring([tensors], trained) and known.isdisjoint(id(t) for t in tensors):
                    self._kept[name] = [weakref.ref(t) for t in tensors]
        return found

    def _forget(self, key: int):
        def forget(ref, models=self._models, names=self._names):
            if models.get(key) is ref:
                del models[key]
                names.pop(key, None)
        return forget


def _tensors(v) -> bool:
    """Whether `v` is a list of tensors (and nothing else), not empty. Not a tuple: an EMA's
    copies are a list, updated in place; a tuple is a batch `(x, y)`, which can be shaped
    like a layer's weight and bias."""
    return isinstance(v, list) and 0 < len(v) <= MAX_KEPT and \
        all(isinstance(t, torch.Tensor) for t in v)


def _held(frames: list) -> tuple[list[tuple[str, torch.nn.Module]], list[tuple[str, list]]]:
    """(path, module) of the modules among the frames' variables and their variables'
    attributes, and (path, tensors) of the lists of tensors among them."""
    modules: dict[int, tuple[str, torch.nn.Module]] = {}
    lists: dict[str, list] = {}
    for frame in frames:
        try:
            items = list(frame.f_locals.items())
            release_locals_snapshot(frame)
            for k, v in items:
                if isinstance(v, torch.nn.Module):
                    modules.setdefault(id(v), (k, v))
                elif _tensors(v):
                    lists.setdefault(k, list(v))
                elif not isinstance(v, ATOMS) and isinstance(getattr(v, "__dict__", None),
                                                              dict):
                    for a, w in list(vars(v).items()):
                        if isinstance(w, torch.nn.Module):
                            modules.setdefault(id(w), (f"{k}.{a}", w))
                        elif _tensors(w):
                            lists.setdefault(f"{k}.{a}", list(w))
        except Exception:  # noqa: BLE001  (an odd object's attributes: the look is a nicety)
            continue
    return list(modules.values()), list(lists.items())
