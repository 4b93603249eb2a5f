"""What a fake training step records: every storage an aten op creates, and its death.

`RecordingMode` is a TorchDispatchMode: for every output of every aten op it records a new
storage with `memprof._C.record_external` (on the fake device, `FAKE_DEVICE_TYPE`: the GPU
that is modelled) and its death - a `weakref.finalize` on the storage - as a free. It also
counts FLOPs with `torch.utils.flop_counter`'s formulas (the registry FlopCounterMode uses;
CPU fused attention counted like the CUDA kernels), so the recompute of checkpointed blocks is
counted. FlopCounterMode itself is not used: its module tracker's backward hooks keep the
recomputed tensors of checkpointed blocks alive until it exits, which inflated the estimated
peak above the measured one. Repeated ops are answered by `fake_op_cache.FakeOpCache` (the
estimator's) instead of FakeTensorMode's own cache.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from .. import _C
from ..record.events import FAKE_DEVICE_TYPE

__all__ = ["StepStorages", "RecordingMode", "unique_storages", "record_buffers"]


def unique_storages(tensors):
    """The tensors, one per storage (tied weights and views share one)."""
    seen = set()
    for t in tensors:
        k = id(t.untyped_storage())
        if k not in seen:
            seen.add(k)
            yield t


_PRIM_DEVICE = torch.ops.prim.device.default
_UNSAFE_VIEW = torch.ops.aten._unsafe_view.default
_VIEW = torch.ops.aten.view.default
#: ops that launch no kernel of their own: an allocation, a read back to the host, a device
#: query, matmul's fold (a view)
_NO_KERNEL = frozenset(op for op in (
    getattr(torch.ops.aten, name, None) for name in ("empty", "empty_strided", "empty_like",
                                                     "_local_scalar_dense", "lift_fresh",
                                                     "_unsafe_view"))
    if op is not None) | {torch.ops.prim.device}

#: keys of kernel scratch records: far above any id() of a storage on a 64-bit CPython
_SCRATCH_KEYS = 1 << 60


def _record(key: int, nbytes: int) -> None:
    _C.record_external(key, nbytes, FAKE_DEVICE_TYPE, 0)


class StepStorages:
    """Storages known to one estimated step; finalizers record frees only while it is active.
    The model's parameters and buffers are known from the start (recorded as pre-existing by
    the tracking session, not by this step)."""

    def __init__(self, model: nn.Module):
        self.live: dict[int, int] = {}   # id(storage) -> nbytes recorded (0: pre-existing)
        self.active = True
        self.ops = 0
        # dispatches that launch a kernel: no view, no device query, no bare allocation
        # (the time model's per-launch floor; `ops` counted 2/3 device queries)
        self.kernels = 0
        self.pass_kernels = 0   # those of forward + backward (memprof.plan.estimate sets it)
        for b in unique_storages(model.buffers()):
            self.live[id(b.untyped_storage())] = 0
        for p in unique_storages(model.parameters()):
            self.live[id(p.untyped_storage())] = 0


def _release(storages: StepStorages, key: int) -> None:
    n = storages.live.pop(key, None)
    if n and storages.active:
        _record(key, -n)


def record_buffers(model: nn.Module) -> None:
    """Buffers exist on the GPU before the step: name them (category "other")."""
    for b in unique_storages(model.buffers()):
        st = b.untyped_storage()
        if st.nbytes():
            _record(id(st), st.nbytes())


class RecordingMode(TorchDispatchMode):
    """Records every new storage produced by an op (and its death) into the tracking session."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Estimates are never compiled: no torch._disable_dynamo wrapper (a frame-evaluation
        # switch on each of a step's ~16k dispatches)
        return False

    def __init__(self, storages: StepStorages, count_flops: bool = True, scratch=None,
                 op_cache=None):
        super().__init__()
        self.storages = storages
        self.op_cache = op_cache    # fake_op_cache.FakeOpCache of the fake mode, or None
        self.flops = 0
        self._registry = _flop_registry() if count_flops else {}
        self.scratch = scratch      # cuda_kernels.KernelScratch: kernels' own memory, or None
        self._next_key = _SCRATCH_KEYS

    def see(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        try:
            st = t.untyped_storage()
        except Exception:  # noqa: BLE001  (storage-less tensors)
            return
        key = id(st)
        live = self.storages.live
        old = live.get(key)
        n = st.nbytes()
        if old is None:
            live[key] = n
            if n:
                _record(key, n)
            weakref.finalize(st, _release, self.storages, key)
        elif old and old != n:  # resized in place (out= ops, resize_)
            _record(key, -old)
            _record(key, n)
            live[key] = n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.storages.ops += 1
        if func is _PRIM_DEVICE:
            # C++ asks every fake tensor for its device through Python (autocast, autograd):
            # 2/3 of a step's dispatches. Answered here as FakeTensorMode answers it, without
            # a second trip through the dispatcher; it creates no storage and counts no FLOPs.
            t = args[0]
            if isinstance(t, FakeTensor) and not t.fake_mode.in_kernel_invocation:
                return t.fake_device
            return func(*args)
        kwargs = kwargs or {}
        if not (getattr(func, "is_view", False)
                or getattr(func, "overloadpacket", None) in _NO_KERNEL):
            self.storages.kernels += 1
        if func is _UNSAFE_VIEW:
            # matmul's fold: FakeTensorMode never caches `_unsafe_view`, but caches `view`,
            # which gives the same tensor (same storage, sizes, strides, offset; the same
            # error for sizes that do not fit) - and autograd above already took
            # `_unsafe_view`'s path. One cache hit instead of a full fake dispatch.
            func = _VIEW
        out = func(*args, **kwargs) if self.op_cache is None else \
            self.op_cache.dispatch(func, args, kwargs)
        formula = self._registry.get(getattr(func, "_overloadpacket", None))
        if formula is not None:
            try:
                self.flops += int(formula(*args, **kwargs, out_val=out))
            except Exception:  # noqa: BLE001  (an unusual signature: count nothing)
                pass
        if isinstance(out, torch.Tensor):
            self.see(out)
        elif isinstance(out, (tuple, list)):
            for o in out:
                if isinstance(o, torch.Tensor):
                    self.see(o)
                elif isinstance(o, (tuple, list)):
                    for q in o:
                        self.see(q)
        if self.scratch is not None:
            self._kernel_memory(func, args)
        return out

    def _kernel_memory(self, func, args) -> None:
        """Scratch a CUDA kernel allocates beyond its outputs, freed when it returns."""
        n = self.scratch.scratch(func, args)
        if n:
            self._next_key += 16
            _record(self._next_key, n)
            _record(self._next_key, -n)

    def record_persistent(self, model: nn.Module) -> None:
        """Process-lifetime kernel memory (cuBLAS workspaces): recorded, never freed."""
        for _, n in (self.scratch.persistent(model) if self.scratch is not None else ()):
            self._next_key += 16
            _record(self._next_key, n)


_FLOP_REGISTRY = None


def _flop_registry() -> dict:
    """torch.utils.flop_counter's formulas (what FlopCounterMode counts), plus the CPU fused
    attention that SDPA runs on fake CPU tensors, counted like the CUDA kernels."""
    global _FLOP_REGISTRY
    if _FLOP_REGISTRY is None:
        from torch.utils.flop_counter import flop_registry, sdpa_backward_flop, sdpa_flop
        reg = dict(flop_registry)
        aten = torch.ops.aten
        if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
            reg[aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_flop
        if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
            reg[aten._scaled_dot_product_flash_attention_for_cpu_backward] = sdpa_backward_flop
        _FLOP_REGISTRY = reg
    return _FLOP_REGISTRY
