"""Repeated fake ops answered from a cheap shape key, in front of FakeTensorMode.

An estimated step dispatches thousands of aten ops on fake tensors; FakeTensorMode answers
most of them from its own cache, but building its key (every argument's full tensor metadata,
generic over symbolic shapes and higher-order ops) and the output from its entry cost about
two thirds of a warm estimate. Estimates never use symbolic shapes, so `FakeOpCache` keys an
op on what its meta kernel can depend on - the op, each fake argument's shape, strides, dtype,
device, layout, storage offset and size, conj/neg/inference bits, requires_grad, and every
other argument's type and value - and answers a repeat with new fake tensors of the recorded
metadata, built as FakeTensorMode builds a cache hit.

Three kinds of op are answered: ops whose outputs can only be new storages (a tensor,
several, or a list: the foreach ops); view ops returning one view of an input or a list of
views of it (unbind, split: the new fake tensors are set onto that input's storage, as
FakeTensorMode does for a single view); in-place ops that write their first argument and
return it or nothing (the optimizer's foreach updates). Never out= or other aliasing ops,
data-dependent or dynamic-shape ops, ops outside aten/prims, or fake tensors carrying a
constant. The first call of each key goes through FakeTensorMode and its result is checked
(fake tensors of this mode, no constant; new outputs each in a storage of its own exactly as
large as its extent, not an input's; views on the storage of exactly one input, the same for
every view of a list; an in-place op returning its first argument or nothing and leaving
every argument's metadata as it was); a key whose result fails the check always goes through
FakeTensorMode.

Constants are answered in two places, the optimizer's step counters (one per parameter and
step) being what makes them count:
- `torch.tensor(0.)`, a real scalar lifted into the mode (`lift_fresh`): FakeTensorMode
  converts a copy of it through its generic meta converter (half a millisecond). The cache
  makes the fake tensor itself and registers it where the converter would (its tensor and
  storage memos, its map of constants by storage: what FakeTensorMode's constant propagation
  and its invalidation of written constants read), once the first lift of the same metadata,
  done by FakeTensorMode, was checked to be registered exactly so.
- `.item()` of a fake tensor that carries a constant is the constant's value, as
  FakeTensorMode's constant propagation computes it.
"""
from __future__ import annotations

import torch
from torch._C import DisableTorchFunction, _DisableTorchDispatch
from torch._subclasses.fake_tensor import FakeTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._mode_utils import no_dispatch

__all__ = ["FakeOpCache"]

_LOCAL_SCALAR_DENSE = torch.ops.aten._local_scalar_dense.default
_LIFTS = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)
_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format,
            torch.layout)
_NO_CACHE_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape,
                  torch.Tag.inplace_view)
# in-place ops that may give their argument other sizes or another storage without the
# inplace_view tag (set_, resize_, resize_as_ carry it)
_RESIZING = frozenset(("_resize_output_",))
_UNCACHEABLE = object()     # an entry: this key's outputs are not what its kind promises
_MISS = object()            # _lookup / _constant_item: not answered here
FRESH, VIEW, VIEWS, INPLACE = "fresh", "view", "views", "inplace"
TUPLE, LIST = "tuple", "list"   # entries of FRESH outputs returned as a tuple / a list


def _kind(func) -> str | None:
    """FRESH: an op whose outputs can only be new storages (a tensor, tensors or a list of
    them); VIEW: an op returning one view of an input; VIEWS: a list of views of one input
    (unbind, split); INPLACE: an op writing its first argument and returning it or nothing;
    None: any other op (judged from its schema and tags)."""
    if not isinstance(func, torch._ops.OpOverload) or func.namespace not in ("aten", "prims"):
        return None
    if any(t in func.tags for t in _NO_CACHE_TAGS):
        return None
    schema = func._schema
    returns = schema.returns
    if schema.is_mutable:
        first = schema.arguments[0].alias_info if schema.arguments else None
        if func._overloadname.startswith("out") or first is None or not first.is_write \
                or not func._opname.endswith("_") or func._opname in _RESIZING:
            return None
        if not returns:
            return INPLACE
        alias = returns[0].alias_info
        same = len(returns) == 1 and alias is not None and alias.is_write \
            and alias.before_set == first.before_set
        return INPLACE if same and isinstance(returns[0].type, torch.TensorType) else None
    if not returns:
        return None
    if func.is_view:
        alias = returns[0].alias_info
        if len(returns) != 1 or alias is None or alias.is_write:
            return None
        if isinstance(returns[0].type, torch.TensorType):
            return VIEW
        return VIEWS if isinstance(returns[0].type, torch.ListType) and isinstance(
            returns[0].type.getElementType(), torch.TensorType) else None
    if any(r.alias_info is not None for r in returns):
        return None
    if all(isinstance(r.type, torch.TensorType) for r in returns):
        return FRESH
    if len(returns) == 1 and isinstance(returns[0].type, torch.ListType) \
            and isinstance(returns[0].type.getElementType(), torch.TensorType):
        return FRESH
    return None


def _meta_like(t):
    """A meta tensor of `t`'s sizes, strides, dtype and requires_grad, made outside every
    mode (what a fake tensor made here wraps)."""
    with DisableTorchFunction(), _DisableTorchDispatch():
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta",
                                   requires_grad=t.requires_grad)


class FakeOpCache:
    """Answers repeated ops of one FakeTensorMode (see the module docstring): `dispatch` is
    what a dispatch mode above FakeTensorMode calls instead of the op."""

    def __init__(self, fake_mode):
        self.fake_mode = fake_mode
        self._unsafe_data_ptr = bool(fake_mode._allow_unsafe_data_ptr_access)
        self._kinds: dict = {}      # func -> FRESH | VIEW | VIEWS | INPLACE | None
        self._entries: dict = {}    # key -> output metadata | _UNCACHEABLE
        self.hits = 0
        self.misses = 0
        self._attrs: dict = {}      # fake device -> the attributes FakeTensor() gives a tensor
        self._lifts: dict = {}      # lifted tensor's metadata -> True when answered here
        self._make = self._make_checked

    def _make_checked(self, elem, device):
        """The first new fake tensor: made by FakeTensor() and by `_make_fast`; when the two
        differ in any attribute, every later one is made by FakeTensor() (a torch whose
        FakeTensor sets up more than this cache knows)."""
        t = FakeTensor(self.fake_mode, elem, device)
        twin = _meta_like(elem)
        fast = self._make_fast(twin, device)
        try:
            same = type(fast) is FakeTensor and fast.__dict__.keys() == t.__dict__.keys() \
                and all(fast.__dict__[k] is t.__dict__[k] or bool(fast.__dict__[k] == t.__dict__[k])
                        for k in t.__dict__)
        except Exception:  # noqa: BLE001  (an attribute that does not compare: not the same)
            same = False
        self._make = self._make_fast if same else \
            (lambda e, d: FakeTensor(self.fake_mode, e, d))
        return t

    def _make_fast(self, elem, device):
        """FakeTensor(mode, elem, device) without its argument checks and normalisation: the
        subclass over the meta tensor, the mode's data-pointer guard, then the attributes a
        tensor made by FakeTensor() on this device carries (copied from one such tensor)."""
        attrs = self._attrs_of(device)
        t = torch.Tensor._make_subclass(FakeTensor, elem, elem.requires_grad, dispatch_device=True,
                                        device_for_backend_keys=device)
        if self._unsafe_data_ptr:
            torch._C._set_warn_deprecated_on_mutable_data_ptr(t)
        else:
            torch._C._set_throw_on_mutable_data_ptr(t)
        t.__dict__.update(attrs)
        return t

    def _key_of(self, out: list, args) -> bool:
        mode = self.fake_mode
        for a in args:
            if type(a) is FakeTensor:
                if a.fake_mode is not mode or a.constant is not None \
                        or a.layout is not torch.strided:
                    return False
                out.append((a.shape, a.stride(), a.dtype, a.fake_device, a.storage_offset(),
                            a.untyped_storage().nbytes(), a.requires_grad, a.is_conj(),
                            a.is_neg(), a.is_inference()))
            elif isinstance(a, _SCALARS):
                out.append(type(a))
                out.append(a)
            elif isinstance(a, (list, tuple)):
                out.append(len(a))
                if not self._key_of(out, a):
                    return False
                out.append(type(a))
            else:       # real or other tensors, SymInts, generators, ...
                return False
        return True

    def dispatch(self, func, args, kwargs):
        """The op's result: answered here when it can be, else from FakeTensorMode (and noted
        for the next call with the same key)."""
        if self.fake_mode.in_kernel_invocation:
            return func(*args, **kwargs)
        out = self._constant_item(func, args)
        if out is not _MISS:
            return out
        if func in _LIFTS:
            return self._lift(func, args, kwargs)
        key = self._key(func, args, kwargs)
        if key is None:
            return func(*args, **kwargs)
        out = self._lookup(key, args)
        if out is _MISS:
            out = func(*args, **kwargs)
            self._remember(key, func, args, kwargs, out)
        return out

    def _constant_item(self, func, args):
        """`.item()` of a fake tensor carrying a constant (the optimizer's step counters: one
        per parameter and step) -> the number, as FakeTensorMode's constant propagation gives
        it (the real op on the constant); _MISS for any other op."""
        if func is _LOCAL_SCALAR_DENSE and len(args) == 1:
            a = args[0]
            if type(a) is FakeTensor and a.fake_mode is self.fake_mode \
                    and a.constant is not None:
                with no_dispatch():
                    return func(a.constant)
        return _MISS

    def _lift(self, func, args, kwargs):
        """A real scalar tensor lifted into the mode -> a fake tensor carrying a copy of it as
        its constant (see the module docstring); any other lift goes to FakeTensorMode."""
        t = args[0] if len(args) == 1 and not kwargs else None
        if type(t) is not torch.Tensor or t.numel() > 1 or t.layout is not torch.strided \
                or t.device.type == "meta" or t.is_conj() or t.is_neg():
            return func(*args, **kwargs)
        key = (func, t.shape, t.stride(), t.storage_offset(), t.dtype, t.device,
               t.requires_grad, t.is_inference(), torch.is_inference_mode_enabled())
        known = self._lifts.get(key)
        if known is None:
            out = func(t)
            self._lifts[key] = self._registered_constant(out, t)
            return out
        if not known:
            return func(t)
        self.hits += 1
        with no_dispatch():
            constant = func(t).clone()      # FakeTensorMode's copy of the lifted value
        out = self._make(_meta_like(constant), constant.device)
        out.constant = constant
        converter = self.fake_mode.fake_tensor_converter
        describer = converter.meta_converter.describer
        converter.meta_converter.tensor_memo[describer.get_tensor_id(constant)] = out
        converter.meta_converter.storage_memo[
            describer.get_storage_id(constant.untyped_storage())] = out.untyped_storage()
        converter.add_constant_storage_mapping(out)
        return out

    def _registered_constant(self, out, t) -> bool:
        """Whether FakeTensorMode's lift of `t` gave a plain fake tensor with a copy of `t`
        as its constant, registered in its converter's memos and map of constants exactly as
        `_lift` registers one, and made as `_lift` makes one (inference-ness as the mode's, no
        real tensor alongside); another torch, or a mode configured otherwise, may do more:
        then lifts go to FakeTensorMode."""
        try:
            c = out.constant
            converter = self.fake_mode.fake_tensor_converter
            meta = converter.meta_converter
            describer = meta.describer
            storage_id = describer.lookup_storage.get(c.untyped_storage())
            memo_storage = meta.storage_memo.get(storage_id) if storage_id is not None else None
            refs = converter.constant_storage_mapping.get(StorageWeakRef(c._typed_storage()), [])
            with no_dispatch():
                equal = bool(torch.equal(c, t))
            return type(out) is FakeTensor and out.fake_mode is self.fake_mode \
                and type(c) is torch.Tensor \
                and c.untyped_storage()._cdata != t.untyped_storage()._cdata and equal \
                and (out.shape, out.stride(), out.storage_offset(), out.dtype,
                     out.requires_grad) == (c.shape, c.stride(), c.storage_offset(), c.dtype,
                                            c.requires_grad) \
                and out.fake_device == c.device \
                and out.is_inference() == torch.is_inference_mode_enabled() \
                and out.__dict__.get("real_tensor") is None \
                and out.untyped_storage().nbytes() == c.untyped_storage().nbytes() \
                and meta.tensor_memo.get(describer.lookup_tensor.get(c)) is out \
                and memo_storage is not None \
                and memo_storage._cdata == out.untyped_storage()._cdata \
                and any(r() is out for r in refs) \
                and set(out.__dict__) == set(self._attrs_of(out.fake_device))
        except Exception:  # noqa: BLE001  (a torch without these internals: not answered)
            return False

    def _attrs_of(self, device) -> dict:
        attrs = self._attrs.get(device)
        if attrs is None:
            with DisableTorchFunction(), _DisableTorchDispatch():
                probe = torch.empty(0, device="meta")
            attrs = self._attrs[device] = dict(FakeTensor(self.fake_mode, probe, device).__dict__)
        return attrs

    def _key(self, func, args, kwargs):
        """The op's cache key, or None when this op or these arguments are not cacheable."""
        kind = self._kinds.get(func, False)
        if kind is False:
            kind = self._kinds[func] = _kind(func)
        if kind is None:
            return None
        parts = [func, torch.get_default_dtype(), torch.is_inference_mode_enabled()]
        if not self._key_of(parts, args):
            return None
        if kwargs:
            for name, v in kwargs.items():
                parts.append(name)
                if not self._key_of(parts, (v,)):
                    return None
        return tuple(parts)

    def _lookup(self, key, args):
        """The op's result for a known key (new fake tensors of the recorded metadata, or the
        written argument); _MISS when not known or not cacheable."""
        entry = self._entries.get(key)
        if entry is None or entry is _UNCACHEABLE:
            return _MISS
        self.hits += 1
        kind, metas = entry
        if kind == INPLACE:
            return args[0] if metas else None
        with DisableTorchFunction(), _DisableTorchDispatch():
            outs = [None if m is None else torch.empty_strided(
                m[0], m[1], dtype=m[2], device="meta", requires_grad=m[4]) for m in metas]
            if kind == VIEW or kind == VIEWS:
                for o, m in zip(outs, metas):
                    o.set_(args[m[6]].untyped_storage(), m[5], m[0], m[1])
        make = self._make
        outs = [None if o is None else make(o, m[3]) for o, m in zip(outs, metas)]
        if kind == TUPLE:
            return tuple(outs)
        return outs if kind == LIST or kind == VIEWS else outs[0]

    def _remember(self, key, func, args, kwargs, result) -> None:
        """Note the outputs of a key's first call (through FakeTensorMode) if they are what
        the op's kind promises."""
        if key in self._entries:    # known and not cacheable
            return
        self.misses += 1
        kind = self._kinds[func]
        entry = _UNCACHEABLE
        if kind == INPLACE:
            # the written tensors' metadata must be as before (the key is made again)
            if (result is None or result is args[0]) and self._key(func, args, kwargs) == key:
                entry = (INPLACE, result is not None)
        elif kind == VIEW or kind == VIEWS:
            views = [result] if kind == VIEW else result
            idx = [self._view_source(v, args) for v in views] if isinstance(views, list) \
                else [None]
            if idx and idx[0] is not None and all(i == idx[0] for i in idx):
                entry = (kind, tuple((tuple(v.shape), v.stride(), v.dtype, v.fake_device,
                                      v.requires_grad, v.storage_offset(), idx[0])
                                     for v in views))
        else:
            shape = FRESH if isinstance(result, torch.Tensor) else \
                TUPLE if isinstance(result, tuple) else LIST if isinstance(result, list) else None
            outs = (result,) if shape == FRESH else result
            if shape is not None and self._fresh_outputs(outs, args, kwargs):
                entry = (shape, tuple(None if o is None else (
                    tuple(o.shape), o.stride(), o.dtype, o.fake_device, o.requires_grad)
                    for o in outs))
        self._entries[key] = entry

    def _plain(self, t) -> bool:
        return type(t) is FakeTensor and t.fake_mode is self.fake_mode and t.constant is None \
            and t.layout is torch.strided and not t.is_conj() and not t.is_neg()

    def _view_source(self, out, args) -> int | None:
        """The index of the one positional argument whose storage the view `out` shares."""
        if not self._plain(out):
            return None
        st = out.untyped_storage()._cdata
        found = [i for i, a in enumerate(args)
                 if isinstance(a, torch.Tensor) and a.untyped_storage()._cdata == st]
        return found[0] if len(found) == 1 else None

    def _fresh_outputs(self, outs, args, kwargs) -> bool:
        inputs = set()
        for a in list(args) + list(kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(t, torch.Tensor):
                    inputs.add(t.untyped_storage()._cdata)
        seen = set()
        for o in outs:
            if o is None:
                continue
            if not self._plain(o) or o.storage_offset() != 0:
                return False
            st = o.untyped_storage()
            if st._cdata in inputs or st._cdata in seen:
                return False
            seen.add(st._cdata)
            extent = 1 + sum((n - 1) * s for n, s in zip(o.shape, o.stride()) if n > 0)
            if o.numel() == 0:
                extent = 0
            if st.nbytes() != extent * o.element_size():
                return False
        return True
