"""How a gradient clip is seen: the per-gradient norms torch computed for the total norm (read
as it computes them, not again), the parameters in the order those norms came, and whether
the gradients a clip scaled were left as it left them (a clip whose result was overwritten
clipped nothing). The health recorder's clip wrapper uses these."""
from __future__ import annotations

import contextlib
import ctypes
import threading
import weakref

import torch

from .snapshots import is_plain_tensor


class NormCatcher:
    """Spies on one total-norm computation at a time, in the thread that started it: the ids of
    the tensors torch._foreach_norm and torch.linalg.vector_norm norm, in call order, and the
    last vector_norm call's input and output (torch's stack of those norms, and the total).
    Other threads, and nested computations, pass straight through."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner = None            # thread id while spying
        self._depth = 0
        self._originals = None
        self._ids: list[int] = []
        self._last = None             # (input, output) of the latest vector_norm call
        self._caught = None           # (ids, stacked norms, total) of the last computation

    @contextlib.contextmanager
    def catching(self):
        if torch.compiler.is_compiling():   # traced by dynamo, not run: nothing to note
            yield
            return
        me = threading.get_ident()
        with self._lock:
            if self._owner not in (None, me):
                mine = False
            else:
                mine = True
                self._depth += 1
                if self._depth == 1:
                    self._owner, self._ids, self._last, self._caught = me, [], None, None
                    self._originals = (torch._foreach_norm, torch.linalg.vector_norm)
                    torch._foreach_norm = self._spy_foreach(self._originals[0])
                    torch.linalg.vector_norm = self._spy_vector(self._originals[1])
        if not mine:
            yield
            return
        ok = False
        try:
            yield
            ok = True
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    torch._foreach_norm, torch.linalg.vector_norm = self._originals
                    self._owner = None
                    self._caught = self._result() if ok else None
                    self._ids, self._last = [], None

    def _result(self):
        """What torch stacked for the total, when it is one plain 1-D norm per noted tensor."""
        if self._last is None:
            return None
        stacked, total = self._last
        ids = self._ids[:-1]          # the last vector_norm call is the total's own
        if not (is_plain_tensor(stacked) and is_plain_tensor(total) and stacked.dim() == 1
                and stacked.numel() == len(ids) and ids):
            return None
        return ids, stacked, total

    def _spy_foreach(self, original):
        def foreach_norm(tensors, *args, **kwargs):
            out = original(tensors, *args, **kwargs)
            if threading.get_ident() == self._owner:
                self._ids.extend(map(id, tensors))
            return out
        return foreach_norm

    def _spy_vector(self, original):
        def vector_norm(x, *args, **kwargs):
            out = original(x, *args, **kwargs)
            if threading.get_ident() == self._owner:
                self._ids.append(id(x))
                self._last = (x, out)
            return out
        return vector_norm

    def take(self, total):
        """(the ids of the normed tensors, in torch's order, and the 1-D tensor of their norms)
        when `total` is the very tensor the last computation returned (not a stale one, not
        another computation's); None otherwise. Forgets the computation either way."""
        caught, self._caught = self._caught, None
        if caught is None or caught[2] is not total:
            return None
        return caught[0], caught[1]


def in_order(params: list | None, grad_ids: list[int]) -> list | None:
    """The parameters whose gradients have these ids, in that order; None if one is missing."""
    if params is None:
        return None
    by_grad = {id(p.grad): p for p in params
               if isinstance(p, torch.Tensor) and p.grad is not None}
    try:
        return [by_grad[i] for i in grad_ids]
    except KeyError:
        return None


def listed_parameters(args: tuple, kwargs: dict) -> tuple[tuple, dict, list | None]:
    """A clip call's `parameters` as a list (a generator is read once: by the clip), passed
    on instead of the original iterable; None when it cannot be listed."""
    if args:
        given = args[0]
    elif "parameters" in kwargs:
        given = kwargs["parameters"]
    else:
        return args, kwargs, None
    if isinstance(given, torch.Tensor):
        return args, kwargs, [given]
    try:
        params = list(given)
    except TypeError:
        return args, kwargs, None   # the clip raises its own error for it
    if args:
        return (params,) + tuple(args[1:]), kwargs, params
    return args, {**kwargs, "parameters": params}, params


class ClippedGrads:
    """The gradients an L2 clip just scaled, and the norm it left them with. Each is kept as a
    weak reference (never kept alive), its version counter, its storage address and the raw
    bytes of its first and last element, read in place (no tensor op, no allocation): what
    tells that it is still the tensor the clip scaled, unchanged."""

    def __init__(self, norm: float, entries: dict):
        self.norm = norm
        # id(grad) -> (weakref, version, (first address, last address, size), their bytes)
        self.entries = entries

    @classmethod
    def after(cls, params: list, norm: float) -> "ClippedGrads | None":
        grads = [p.grad for p in params if isinstance(p, torch.Tensor) and p.grad is not None]
        entries = {}
        for g in grads:
            where = _edges(g)
            if where is None or id(g) in entries:   # a repeated one counts twice in the norm
                return None
            entries[id(g)] = (weakref.ref(g), g._version, where, _read(where))
        # a scaled tensor changes every element but its zeros: all-zero edges prove nothing
        if not any(any(b) for *_, edge in entries.values() for b in edge):
            return None
        return cls(norm, entries)

    def norm_of(self, grads: list) -> float | None:
        """The clip's norm when `grads` are exactly the clipped gradients, unchanged since."""
        if len(grads) != len(self.entries):
            return None
        for g in grads:
            ref, version, where, edge = self.entries.get(id(g), (None, None, None, None))
            # the same place (re-derived: `.data = ...` swaps a storage without a version
            # bump) before its bytes are read there
            if ref is None or ref() is not g or g._version != version \
                    or _edges(g) != where or _read(where) != edge:
                return None
        return self.norm


def _edges(g: torch.Tensor) -> tuple[int, int, int] | None:
    """(address of the first element, of the last, element size) of a dense CPU tensor; None
    for anything else (or an empty tensor)."""
    if not is_plain_tensor(g) or not g.is_cpu or g.layout != torch.strided or g.numel() == 0:
        return None
    size, first = g.element_size(), g.data_ptr()
    return first, first + size * sum((d - 1) * st for d, st in zip(g.shape, g.stride())), size


def _read(where: tuple[int, int, int]) -> tuple[bytes, bytes]:
    first, last, size = where
    return ctypes.string_at(first, size), ctypes.string_at(last, size)
