"""Models bigger than this machine: build them on the meta device, estimate them on fakes.

`build(factory, kwargs, label)` calls a model factory under `torch.device("meta")` first: a
module built that way has shapes and dtypes but no storage, so a 7B-parameter LLM "builds" in
milliseconds and a few MB of host memory, and the estimate converts its parameters to fake CPU
tensors (`fake_like`). Only when the factory cannot run on meta (it reads weights from a file,
calls `.item()`, ...) is it called again for real, with `HostMemoryGuard` counting the host
memory its tensors take (a checkpoint `torch.load` reads is read on meta by the first try and
memory-mapped by the second, `_loading`): past 80 % of the memory available when it started, the build stops
with a one-line error that suggests the meta path, instead of the kernel's OOM killer ending
the process.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch.overrides import TorchFunctionMode

from .errors import PlanInputError

__all__ = ["build", "fake_like", "host_available_bytes", "HostMemoryGuard", "HOST_SHARE"]

#: share of the host memory available at the start that a real (non-meta) build may take
HOST_SHARE = 0.8


def host_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux), else physical pages x page size."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fake_like(fake_mode, t: torch.Tensor) -> torch.Tensor:
    """A fake CPU tensor for `t`: `from_tensor` for real tensors; for meta tensors (a model
    built on the meta device) a fake CPU tensor of the same shape, strides and dtype."""
    if t.device.type != "meta":
        return fake_mode.from_tensor(t)
    with fake_mode:
        return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype,
                                   device="cpu")


class HostMemoryGuard(TorchFunctionMode):
    """Counts the bytes of CPU tensors created while active; raises MemoryError past `limit`."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = int(limit)
        self.bytes = 0
        self._seen: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.device.type == "cpu":
            try:
                st = out.untyped_storage()
            except Exception:  # noqa: BLE001  (storage-less tensors)
                return out
            key = st.data_ptr()
            if key and key not in self._seen:
                self._seen.add(key)
                self.bytes += st.nbytes()
                if self.bytes > self.limit:
                    raise MemoryError(self.bytes)
        return out


def _too_big(label: str, nbytes: int, limit: int) -> PlanInputError:
    g = 1 << 30
    return PlanInputError(
        f"model {label}: building it allocates more than {nbytes / g:.1f} GiB of host memory "
        f"({HOST_SHARE:.0%} of the {limit / HOST_SHARE / g:.1f} GiB available) and it cannot be "
        "built on the meta device; make the factory meta-friendly (build it inside "
        "`with torch.device('meta'):`, load no weights) or pass a module built on meta - "
        "memprof needs shapes, never weights")


@contextlib.contextmanager
def _loading(**forced):
    """torch.load with `forced` keywords while a factory builds: a checkpoint is read on the
    meta device by the meta attempt (shapes only; it read every byte into host memory, and
    load_state_dict into meta parameters keeps none of them), memory-mapped by the real build
    (file pages, not the host memory the guard keeps: torch.load's tensors never pass through
    it). A file torch cannot map (the legacy format) is read as the factory asked."""
    original = torch.load

    def load(f, *args, **kwargs):
        # (map_location, pickle_module, ... as torch.load takes them after the file)
        kwargs.update(zip(("map_location", "pickle_module", "weights_only", "mmap"), args))
        if "mmap" in forced and not isinstance(f, (str, os.PathLike)):
            return original(f, **kwargs)
        try:
            return original(f, **{**kwargs, **forced})
        except RuntimeError:
            if "mmap" not in forced:
                raise
            return original(f, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def build(factory, kwargs: dict, label: str):
    """factory(**kwargs) -> (module, 'meta' | 'cpu'); see the module docstring. Errors of the
    factory itself propagate (the caller words them)."""
    try:
        with torch.device("meta"), _loading(map_location="meta"):
            return factory(**kwargs), "meta"
    except Exception:  # noqa: BLE001  (not meta-friendly: build it for real, guarded)
        pass
    limit = int(HOST_SHARE * host_available_bytes())
    guard = HostMemoryGuard(limit)
    try:
        with guard, _loading(mmap=True):
            return factory(**kwargs), "cpu"
    except MemoryError:
        raise _too_big(label, guard.bytes, limit) from None
