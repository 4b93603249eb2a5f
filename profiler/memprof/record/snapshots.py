"""Which storages hold parameters, gradients, optimizer state and module buffers, and when.

The allocator only sees bytes; what they are is known from Python. Before tracking starts the
blocks memprof can name (parameters, gradients, optimizer state) become the baseline; at each
optimizer step the gradients (before it) are noted - unless they are the very storages, at
the same addresses, that the last note named - and the optimizer state (after it) when a look
is due (`Looks`: every step while it changes, ever less often while it does not), and at the
end all three once more. Module buffers (BatchNorm statistics, position ids, rotary tables)
are noted at the start, at the end of a step where one was set (register_buffer, assigned,
Module._apply) or a look finds their storages changed, and at the end, each owned by the
module that registered it. Each note is a `Snapshot`: a marker in the event stream plus the
storage addresses it names, matched to allocations after the run (profile.py): an allocation
alive at the marker is named for its whole life.
"""
from __future__ import annotations

import sys
import time
import weakref
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

from .. import _C
from .events import (CAT_BUFFERS, CAT_GRADIENTS, CAT_OPTIMIZER_STATE, CAT_OTHER,
                     CAT_PARAMETERS, CAT_RECOMPUTED_WEIGHTS, DEVICE_CPU, DEVICE_CUDA,
                     FAKE_DEVICE_TYPE)
from .holders import is_library_frame, loop_frame
from .not_trained import Beside, Changes, mirroring, not_trained, trainable_storages
from .recomputed_weights import RecomputingModules


#: the most steps between two looks at storages that have stayed the same (see Looks)
MAX_LOOK_GAP = 32


class Looks:
    """When to look again at storages that seldom change (optimizer state updated in place,
    module buffers): at every step while a look finds them changed, the gap doubling after
    each look that finds them the same, up to MAX_LOOK_GAP steps. A look costs ~20 us at
    the end of a big step (its objects have left the caches; measured on the benchmark MLP),
    more than a per-step note is worth: storages that changed in between are noted at the
    next look, still alive, and a snapshot names an allocation for its whole life (only one
    made and freed between two looks goes unnamed, and its kind is looked at every step)."""

    __slots__ = ("next", "gap")

    def __init__(self):
        self.next = 0
        self.gap = 1

    def due(self, step: int) -> bool:
        return step >= self.next

    def looked(self, step: int, changed: bool) -> None:
        self.gap = 1 if changed else min(2 * self.gap, MAX_LOOK_GAP)
        self.next = step + self.gap


@dataclass(slots=True)   # one per step for the run: no __dict__ each
class Snapshot:
    """Storages known to hold one category at one point of the run (a marker in the stream)."""
    marker: int               # index into the run's events of the marker event
    category: int
    # an array('q') while recording (a list of addresses took ~48 bytes per entry, a pointer
    # to an int object, against 8, and one per step for the run: a list Python's garbage
    # collector walks at every full collection), a list as read
    ptrs: Sequence[int]
    modules: Sequence[int] | None = None  # owning module id per ptr (the parameter's module)
    # parameters: per ptr 1 where a parameter at it requires grad, 0 frozen, 2 one that no
    # optimizer trains but that changes (not_trained.py: an EMA copy); None: not noted
    # (another category, or a profile saved before memprof noted it)
    trainable: Sequence[int] | None = None


_is_functional = torch._is_functional_tensor
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def is_plain_tensor(t: torch.Tensor) -> bool:
    """A torch.Tensor (or nn.Parameter made from one) that wraps nothing (no functionalization
    or functorch level): never fake and never a DTensor. Gradients, optimizer state and
    parameters are; checking this in C is ~8x cheaper than is_fake, which the snapshots at
    every step would otherwise pay per tensor."""
    return type(t) in _PLAIN_TYPES and not _is_functional(t) and not _is_functorch_wrapped(t)


def storage_key(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(address, nbytes, device_type) of a tensor's storage; None for storage-less tensors.

    A fake tensor's storage has no address: the identity of its Python storage object stands
    in for it (PyTorch keeps one storage object per StorageImpl alive), which is also the key
    memprof.plan records its allocations under."""
    try:
        if not is_plain_tensor(t):
            t = _local_shard(t)
            if is_fake(t):
                st = t.untyped_storage()
                return id(st), st.nbytes(), FAKE_DEVICE_TYPE
        st = t.untyped_storage()
        ptr = st.data_ptr()
    except Exception:  # noqa: BLE001  (meta or otherwise storage-less tensors)
        return None
    if ptr == 0:
        return None
    return ptr, st.nbytes(), (DEVICE_CUDA if t.is_cuda else DEVICE_CPU)


def storage_ptr(t: torch.Tensor) -> int | None:
    """storage_key(t)[0] (None for storage-less tensors) as a snapshot names it: a plain
    tensor's (a DTensor's local shard's) through _C.plain_storage_addresses, which leaves out
    a block allocated past the end of a full event log."""
    local = t if is_plain_tensor(t) else _local_shard(t)
    if is_plain_tensor(local):
        address = _C.plain_storage_addresses([local])[0]
        if address >= 0:
            return address or None
    key = storage_key(t)
    return None if key is None else key[0]


def local_nbytes(t: torch.Tensor) -> int:
    """The bytes of `t` this rank holds: a DTensor's (FSDP2's parameter's) local shard."""
    local = t if is_plain_tensor(t) else _local_shard(t)
    return local.numel() * local.element_size()


def _local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2's parameters, gradients, optimizer state): the only part
    with storage on this rank. Read as an attribute: to_local() would record an autograd op.
    torch.distributed.tensor is not imported for this."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is not None and isinstance(t, dtensor):
        return getattr(t, "_local_tensor", t)
    return t


def state_pairs(optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(state tensor, its parameter) for every tensor of an optimizer's state, also those in
    lists (LBFGS keeps its curvature history as lists of tensors)."""
    out = []
    for p, st in optimizer.state.items():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                out.append((v, p))
            elif isinstance(v, (list, tuple)):
                out.extend((t, p) for t in v if isinstance(t, torch.Tensor))
    return out


def storage_ptrs(tensors: list[torch.Tensor]) -> list[int | None]:
    """storage_ptr of each tensor; the plain ones (every gradient and optimizer state tensor
    of a run on a device) read in C++ in one call."""
    addresses = _C.plain_storage_addresses(tensors)
    return [(a or None) if a >= 0 else storage_ptr(t) for a, t in zip(addresses, tensors)]


def storage_parts(tensors: list, owners: list) -> tuple[list, list]:
    """A sparse tensor has no storage: its values and indices hold its memory (a sparse
    gradient of nn.Embedding(sparse=True) read "other", and gradients 0). (tensors, owners)
    with each sparse one replaced by those parts, each with its owner."""
    if all(t.layout == torch.strided for t in tensors):
        return tensors, owners
    out_t, out_o = [], []
    for t, owner in zip(tensors, owners):
        if t.layout == torch.sparse_coo:
            parts = (t._values(), t._indices())
        elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
            parts = (t.values(), t.crow_indices(), t.col_indices())
        elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
            parts = (t.values(), t.ccol_indices(), t.row_indices())
        else:
            parts = (t,)
        out_t += parts
        out_o += [owner] * len(parts)
    return out_t, out_o


def _sorted_storage_ptrs(pairs: list[tuple[torch.Tensor, int]]) -> list[int]:
    """The sorted storage addresses of the tensors of (tensor, module id) pairs."""
    return sorted(k for k in storage_ptrs([t for t, _ in pairs]) if k is not None)


class SnapshotRecorder:
    """Always installed: categories are not optional."""

    def __init__(self, session):
        self.session = session
        # each note as (category, ptrs, modules, trainable), in the order taken: the run's
        # Snapshots are made from these, with their markers, when it is assembled. A tuple,
        # not a Snapshot (a dataclass's __init__ is one more cold Python frame at every step);
        # and tuples of ints and arrays, unlike a slotted object, are dropped from the garbage
        # collector's walks - one per step for the run
        self.taken: list[tuple] = []
        self.baseline: list[tuple[int, int, int, int, int]] = []  # ptr, size, dev, module, cat
        self.baseline_trainable: dict[int, int] = {}   # parameter storage -> 1 trains, 0 not
        # models beside the session's (an EMA copy never called); which parameters changed
        # since first seen (not_trained.py); the untrained ids of the last parameters' note
        self.beside = Beside()
        self._changes = Changes()
        self._last_untrained: set[int] = set()
        self.looks: list[list] = []   # [steps ended, seconds] per _look_step (PAUSES)
        self._buffer_keys: list[int] = []        # buffer storages at the last buffer note
        # (category, id(optimizer)) -> (owners known, _C.StorageNote) at its last note
        self._noted: dict[tuple[int, int], tuple] = {}
        # id(optimizer) -> _C.GradientNote: its plain gradients at its last step
        self._gradient_notes: dict[int, object] = {}
        self._note_finalizers: list = []
        self._state_looks: dict[int, Looks] = {}   # id(optimizer) -> when to look again
        # category -> the owner arrays of its last few snapshots (see _note)
        self._recent_modules: dict[int, list[array]] = {}
        # the event log was full at the end of a step: no per-step snapshot from then on (the
        # callers of _note return early). Read at step ends, so the step in which it filled
        # is noted whole (its gradients were allocated in it); later, a snapshot's marker
        # would follow the last event kept, where every block whose free was dropped reads
        # alive: it would name blocks of steps long before by their addresses, and a long run
        # past its capacity would keep one per step for nothing. The block's end notes anyway.
        self._log_full = False
        self._buffer_looks = Looks()
        # buffers set since the last look (register_buffer, a buffer assigned, Module._apply)
        # or modules named since (their buffers unseen): look at this step's end
        self._buffers_set = False
        self._modules_seen: tuple[int, int] | None = None
        # parameters made or moved since the last look (Module._apply) or modules named
        # since: noted at this step's end, while their model lives - in auto mode a model
        # freed before the block's end (a fold of a k-fold loop) is noted nowhere else
        self._params_moved = False
        self._hook = None   # the global buffer registration hook's handle
        self._recomputing = RecomputingModules()   # old-style weight_norm's modules

    def _module_of(self, p) -> int:
        return self.session.scope.param_module.get(id(p), -1)

    def collect_baseline(self) -> None:
        """Blocks alive before tracking that memprof can name. The CPU allocator would free
        them without a report (it knows only the sizes of blocks made while profiling), so
        their frees are watched natively: a freed one does not stay "alive" in the profile."""
        seen: set[int] = set()
        cpu_blocks: list[torch.Tensor] = []

        def add(t, cat, module):
            key = storage_key(t)
            if key is None or key[0] in seen:
                return
            seen.add(key[0])
            self.baseline.append((key[0], key[1], key[2], module, cat))
            if key[2] == DEVICE_CPU:
                cpu_blocks.append(t if is_plain_tensor(t) else _local_shard(t))

        params = self.session.params()
        if self.session.scope.model is not None:   # (auto mode: no model is known yet)
            self._look_beside(params)
        untrained = self._untrained()
        params = self.params(params, untrained)
        self.baseline_trainable = trainable_storages(params, storage_ptrs(params), untrained)
        for p in params:
            add(p, CAT_PARAMETERS, self._module_of(p))
            if p.grad is not None:
                for part in storage_parts([p.grad], [p])[0]:
                    add(part, CAT_GRADIENTS, self._module_of(p))
        opt = self.session.steps.optimizer
        if opt is not None:
            for v, p in state_pairs(opt):
                add(v, CAT_OPTIMIZER_STATE, self._module_of(p))
        buffers = self.buffers()
        for b, mid in buffers:
            add(b, CAT_BUFFERS, mid)
        # lists beside that may be an EMA's copies: "other" until a look sees them change
        for t in mirroring(list(self.beside.kept().values()),
                           [p for p in params if p.requires_grad]):
            add(t, CAT_OTHER, -1)
        self._buffer_keys = _sorted_storage_ptrs(buffers)
        _C.watch_baseline_frees(cpu_blocks)

    def buffers(self) -> list[tuple[torch.Tensor, int]]:
        """(buffer, id of the module that registered it) over the modules named so far."""
        # the modules' own buffer dicts: what buffers(recurse=False) yields, read directly
        # (this runs at every step end, and most modules have none)
        return [(b, mid) for m, mid in self.session.scope.module_ids()
                for b in m._buffers.values() if b is not None]

    def note_buffers(self, force: bool = False) -> bool:
        """A buffers snapshot, when their storages changed since the last one (or `force`);
        whether one was taken. The addresses are read in C++ where every buffer is a plain
        tensor (an unchanged model's check walks no Python per module)."""
        keys = _C.module_buffer_addresses(self.session.scope.module_refs())
        pairs = None
        if keys is None:
            pairs = self.buffers()
            keys = _sorted_storage_ptrs(pairs)
        if force or keys != self._buffer_keys:
            self._buffer_keys = keys
            pairs = self.buffers() if pairs is None else pairs
            self._take(CAT_BUFFERS, [b for b, _ in pairs], [mid for _, mid in pairs])
            return True
        return False

    def install(self) -> None:
        self.session.steps.on_optimizer_pre.append(self._before_optimizer)
        self.session.steps.on_optimizer_post.append(self._after_optimizer)
        self.session.steps.on_step_end.append(self._step_end)
        self.session.steps.on_look_step.append(self._look_step)
        # what sets a buffer says so (a rotary cache rebuilt for a longer sequence is seen at
        # that step's end); Module._apply (model.to(), .half()) writes the buffer dicts itself
        self._hook = torch.nn.modules.module.register_module_buffer_registration_hook(
            self._buffer_set)
        self.session.patches.patch(torch.nn.Module, "_apply", self._wrap_apply)

    def remove(self) -> None:
        if self._look_step in self.session.steps.on_look_step:
            self.session.steps.on_look_step.remove(self._look_step)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _buffer_set(self, module, name, buffer) -> None:
        self._buffers_set = True

    def _wrap_apply(self, original):
        recorder = self

        def _apply(module, *args, **kwargs):
            recorder._buffers_set = recorder._params_moved = True
            return original(module, *args, **kwargs)
        return _apply

    def _step_end(self) -> None:
        """The buffers, when a look is due, a buffer was set or modules were named."""
        if self._log_full:
            return
        step = self.session.steps.step
        seen = self.session.scope.naming()
        if self._params_moved or seen != self._modules_seen:
            self._params_moved = False
            self.note_parameters()
        if self._buffers_set or seen != self._modules_seen or \
                step >= self._buffer_looks.next:   # (Looks.due, inline: every step)
            self._buffers_set, self._modules_seen = False, seen
            self._buffer_looks.looked(step, self.note_buffers())
        recomputing = self._recomputing
        if seen != recomputing.naming:
            recomputing.find(self.session.scope, seen)
        if recomputing.any:   # a new storage at each forward: noted at every step end
            weights, owners = recomputing.weights()
            if weights:   # (the modules may be gone)
                self._take(CAT_RECOMPUTED_WEIGHTS, weights, owners)
        self._log_full = _C.log_full()

    def _look_step(self) -> None:
        """Steps 2, 4, 8, ...: the parameters again where a model beside the session's was
        found or which parameters are not trained changed since the last note (an EMA copy
        updated after the first note's step: the parameters' note names it for its life)."""
        if self._log_full:
            return
        t0 = time.perf_counter()
        own = self.session.params()
        seen = self.session.scope.naming()
        try:
            found = self._look_beside(own)
        except Exception:  # noqa: BLE001  (a look must never break training)
            found = False
        untrained = self._untrained()
        if found or untrained != self._last_untrained:
            self._note(*self._parameters(self.params(own, untrained), untrained))
        if self._modules_seen == seen:   # (names given beside: noted here, not again at
            self._modules_seen = self.session.scope.naming()   # the next step's end)
        self.looks.append([self.session.steps.step, time.perf_counter() - t0])

    def _look_beside(self, own: list) -> bool:
        """Beside.look at the training loop's frame and the block's (`own`: the session's
        parameters); whether a model was found."""
        frames = [loop_frame(sys._getframe(1)), self.session.frame]
        frames = [f for i, f in enumerate(frames) if f is not None and f not in frames[:i]
                  and not is_library_frame(f)]
        found = self.beside.look(frames, own)
        for name, model in self.beside.named() if found else ():
            self.session.scope.name_beside(name, model)
        return found

    def params(self, own: list | None = None, untrained: set[int] | None = None
               ) -> list[torch.Tensor]:
        """session.params() (`own`, where the caller has it), the parameters of the models
        beside them and the tensors of lists beside them that are not trained (`untrained`:
        _untrained(), else the last parameters' note's), named after their lists."""
        params = list(self.session.params() if own is None else own)
        beside = self.beside.models()
        untrained = self._last_untrained if untrained is None else untrained
        kept = [(name, [t for t in tensors if id(t) in untrained])
                for name, tensors in self.beside.kept().items()]
        if not beside and not any(tensors for _, tensors in kept):
            return params
        seen = {id(p) for p in params}
        for m in beside:
            params += [p for p in m.parameters() if id(p) not in seen]
            seen.update(id(p) for p in m.parameters())
        for name, tensors in kept:
            if tensors:
                self.session.scope.name_kept(name, tensors)
                params += [t for t in tensors if id(t) not in seen]
                seen.update(id(t) for t in tensors)
        return params

    def _before_optimizer(self, optimizer) -> None:
        if not self.session.steps.watches(optimizer) or self._log_full:
            return
        # plain parameters and gradients (a run on a device): read, compared and, when new,
        # owned in C++ (the gradients are new storages at every step after
        # zero_grad(set_to_none=True)); anything else takes the Python path below
        note = self._gradient_notes.get(id(optimizer))
        if note is None:
            note = self._gradient_notes[id(optimizer)] = self._new_gradient_note(optimizer)
            # a new optimizer may update a new model (a sweep's next trial, built in the
            # block): its parameters are noted at this step's end (session.params has them)
            self._params_moved = True
        taken = note.take(optimizer.param_groups, self.session.scope.param_module)
        if taken is None:
            return
        if taken is not False:
            self._note(CAT_GRADIENTS, *taken)
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads, params = storage_parts([p.grad for p in params], params)
        note = self._last_note(CAT_GRADIENTS, optimizer)
        if note is None or not note.same(grads):
            self._take_noted(CAT_GRADIENTS, optimizer, grads, params)

    def _after_optimizer(self, optimizer) -> None:
        looks = self._state_looks.get(id(optimizer))
        if looks is None:
            looks = self._state_looks[id(optimizer)] = Looks()
        step = self.session.steps.step
        if step >= looks.next and not self._log_full:   # (looks.due, inline: every step)
            looks.looked(step, self.note_state(optimizer))

    def note_parameters(self) -> None:
        """A snapshot of the parameters of the model or the roots alive (and the watched
        optimizers')."""
        untrained = self._untrained()
        self._note(*self._parameters(self.params(untrained=untrained), untrained))

    def note_state(self, optimizer) -> bool:
        """A snapshot of the optimizer's state unless it is the storages last noted; whether
        one was taken."""
        note = self._last_note(CAT_OPTIMIZER_STATE, optimizer)
        if note is not None and note.same_state(optimizer.state):
            return False
        pairs = state_pairs(optimizer)
        self._take_noted(CAT_OPTIMIZER_STATE, optimizer, [t for t, _ in pairs],
                         [p for _, p in pairs])
        return True

    def _last_note(self, category: int, optimizer):
        """This optimizer's last note of `category` (a _C.StorageNote), if it can still be
        compared: the caller asks it whether the storages it named are still the very ones
        (alive, at the same addresses) - a storage that kept its address kept its allocation,
        which that snapshot already named (optimizer state is updated in place, so this is
        every step after the first). None when there is none, when a parameter's module was
        named since, or when the last tensors were not all plain (fake tensors and other
        wrappers are noted every time). The owners are not compared: a state tensor stays
        with its parameter, and the owner of a parameter, once named, does not change."""
        noted = self._noted.get((category, id(optimizer)))
        if noted is None or noted[0] != len(self.session.scope.param_module):
            return None
        return noted[1]

    def _take_noted(self, category: int, optimizer, tensors: list, params: list) -> None:
        """take() of tensors[i] held for params[i], remembering which storages it named (see
        _last_note)."""
        owners_known = len(self.session.scope.param_module)   # only ever grows
        self._take(category, tensors, [self._module_of(p) for p in params])
        note = _C.StorageNote()
        self._noted[(category, id(optimizer))] = \
            (owners_known, note) if note.note(tensors) else None

    def take(self, category: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Remember which storages hold `category` now; pairs are (tensor, its parameter)."""
        if self._log_full:
            return
        self._take(category, [t for t, _ in pairs], [self._module_of(p) for _, p in pairs])

    def _take(self, category: int, tensors: list[torch.Tensor], modules: list[int]) -> None:
        """The same, for tensors and the id of the module owning each."""
        self._note(*self._owned(category, tensors, modules))

    @staticmethod
    def _owned(category: int, tensors, modules,
               ptrs: list | None = None) -> tuple[int, list[int], list[int]]:
        """(category, the tensors' storage addresses in their order, each once, the module
        owning each: the first tensor's at an address). In the tensors' order, not the
        addresses': the owners then read the same from one snapshot to the next (see _note).
        `ptrs`: storage_ptrs(tensors), where the caller has them."""
        owner: dict[int, int] = {}
        for ptr, mid in zip(storage_ptrs(list(tensors)) if ptrs is None else ptrs, modules):
            if ptr is not None:
                owner.setdefault(ptr, mid)
        return category, list(owner), list(owner.values())

    def _parameters(self, params: list, untrained: set[int] | None = None
                    ) -> tuple[int, list[int], list[int], array]:
        """_owned(CAT_PARAMETERS, ...) of `params` plus whether each storage trains
        (`untrained`: _untrained(), where the caller has it)."""
        every = storage_ptrs(list(params))   # read once for both
        category, ptrs, modules = self._owned(CAT_PARAMETERS, params,
                                              [self._module_of(p) for p in params], every)
        if untrained is None:
            untrained = self._untrained()
        self._last_untrained = untrained
        trains = trainable_storages(params, every, untrained)
        return category, ptrs, modules, array("b", [trains[a] for a in ptrs])

    def _untrained(self) -> set[int]:
        """not_trained.not_trained of the roots named so far and the models beside them, by
        the parameters that any optimizer seen stepping updates (StepClock.updated: where
        track() was given one, another that it does not watch may train the other roots, a
        GAN's two)."""
        try:
            return not_trained(self.session.scope.root_modules() + self.beside.models(),
                               self.session.steps.updated, self._changes,
                               list(self.beside.kept().values()))
        except Exception:  # noqa: BLE001  (a look must never break training: an odd
            return set()   # parameter's reading falls back to requires_grad alone)

    def _note(self, category: int, ptrs, modules, trainable=None) -> None:
        """A snapshot of storage addresses and the owning module of each (and, of
        parameters, whether each trains)."""
        # (inline, and a loop, not a generator: the gradients' note runs at
        # every step, where each Python frame is cold)
        if not isinstance(modules, array):
            modules = array("q", modules)
        # one owner array for the run while the owners stay (gradients: every step), also
        # where two optimizers (a GAN's) or two paths note the same category in turn
        recent = self._recent_modules.setdefault(category, [])
        for kept in recent:
            if kept == modules:
                modules = kept
                break
        else:
            recent.insert(0, modules)
            del recent[4:]
        _C.mark("snapshot", category)   # the marker's index is found after the run
        self.taken.append((category, ptrs if isinstance(ptrs, array) else array("q", ptrs),
                           modules, trainable))

    def _new_gradient_note(self, optimizer):
        """A note that lets go of its parameters and its address watch (one of a few, see
        csrc/address_watch.cpp) when the optimizer is collected: a loop that makes a new
        optimizer every epoch does not hold them all."""
        note = _C.GradientNote()
        key = id(optimizer)

        def optimizer_gone(notes=self._gradient_notes, note=note):
            note.forget()
            if notes.get(key) is note:
                del notes[key]
        self._note_finalizers.append(weakref.finalize(optimizer, optimizer_gone))
        return note

    def release(self) -> None:
        """The session is over: the gradient notes let go of the parameters they hold."""
        for finalizer in self._note_finalizers:
            finalizer.detach()
        self._note_finalizers.clear()
        for note in self._gradient_notes.values():
            note.forget()
        self._gradient_notes.clear()

    def final(self) -> None:
        for noted in self.at_end():
            self._note(*noted)

    def at_end(self) -> list[tuple]:
        """(category, storage addresses, owning module of each, and for the parameters
        whether each trains) of what the block's end notes - parameters, their gradients, the
        watched optimizers' state, the buffers - read now and noted nowhere: final() notes
        them; a profile made while the block goes on (Session.so_far) ends with them, so the
        parameters of a model built inside the block are parameters there too."""
        untrained = self._untrained()
        params = self.params(untrained=untrained)
        states = []
        for opt in self.session.steps.watched():
            states += state_pairs(opt)
        buffers = self.buffers()
        grads, grad_params = storage_parts(
            [p.grad for p in params if p.is_leaf and p.grad is not None],
            [p for p in params if p.is_leaf and p.grad is not None])   # (a non-leaf warns)
        self._recomputing.look(self.session.scope)
        weights, owners = self._recomputing.weights()
        return [self._parameters(params, untrained),
                self._owned(CAT_GRADIENTS, grads, [self._module_of(p) for p in grad_params]),
                self._owned(CAT_OPTIMIZER_STATE, [t for t, _ in states],
                            [self._module_of(p) for _, p in states]),
                self._owned(CAT_BUFFERS, [b for b, _ in buffers], [mid for _, mid in buffers]),
                self._owned(CAT_RECOMPUTED_WEIGHTS, weights, owners)]
