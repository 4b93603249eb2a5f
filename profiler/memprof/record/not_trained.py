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
session's (`Beside`).

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
#: elements of a parameter compared between notes (spread over it: an EMA's update moves
#: nearly every element, a rounding-sized one most)
SAMPLE = 256


def not_trained(roots: list, trained: set[int], changes: "Changes") -> set[int]:
    """ids of the parameters of `roots` that no optimizer updates (`trained`: ids of those
    that one does, StepClock.updated) where one updates some root's, and that either belong
    to a root of which it updates none and are left requiring grad (an AveragedModel), or
    are frozen and changed since first seen (`changes`): in a model beside, or in the
    trained one (its `self.ema`). Empty without an optimizer's parameters to go by (a
    hand-written update: requires_grad is all there is)."""
    groups = [list(m.parameters()) for m in roots]
    is_trained = [any(id(p) in trained for p in g) for g in groups]
    if not any(is_trained):
        return set()
    out, frozen = set(), []
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
    parameters it already notes), held weakly: an EMA copy never called (see the module
    docstring)."""

    def __init__(self):
        self._models: dict[int, weakref.ref] = {}

    def models(self) -> list[torch.nn.Module]:
        """The models found, still alive."""
        return [m for m in (r() for r in list(self._models.values())) if m is not None]

    def look(self, frames: list, known: set[int]) -> bool:
        """Take in the models with parameters that `frames` hold (a variable, or an
        attribute of one: a trainer's `self.ema`, a wrapper's `.module`) none of whose
        parameters is in `known` (ids: the session's) or a model found before; whether one
        was new. Walked with the thread's tracer suspended, as the leak walks are: under a
        script's coverage tool or debugger each line of it was the tracer's event."""
        with _C.untraced():
            return self._look(frames, known)

    def _look(self, frames: list, known: set[int]) -> bool:
        known = known | {id(p) for m in self.models() for p in m.parameters()}
        found = False
        for module in _held_modules(frames):
            if len(self._models) >= MAX_BESIDE:
                break
            params = [id(p) for p in module.parameters()]
            if params and id(module) not in self._models and known.isdisjoint(params):
                self._models[id(module)] = weakref.ref(module, self._forget(id(module)))
                known.update(params)
                found = True
        return found

    def _forget(self, key: int):
        def forget(ref, models=self._models):
            if models.get(key) is ref:
                del models[key]
        return forget


def _held_modules(frames: list) -> list[torch.nn.Module]:
    """The modules among the frames' variables and their variables' attributes."""
    out: dict[int, torch.nn.Module] = {}
    for frame in frames:
        try:
            values = list(frame.f_locals.values())
            release_locals_snapshot(frame)
            for v in values:
                if isinstance(v, torch.nn.Module):
                    out.setdefault(id(v), v)
                elif not isinstance(v, ATOMS) and isinstance(getattr(v, "__dict__", None),
                                                              dict):
                    for a in list(vars(v).values()):
                        if isinstance(a, torch.nn.Module):
                            out.setdefault(id(a), a)
        except Exception:  # noqa: BLE001  (an odd object's attributes: the look is a nicety)
            continue
    return list(out.values())
