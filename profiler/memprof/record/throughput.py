"""Throughput recorder: the markers and clocks that let analyse.throughput split each step into
data wait, forward, evaluation, backward and optimizer (see that module for the split).

- `batch` markers: the leading dimension of the first tensor passed to the pass's module (the
  root, or a model a never-called container holds); `eval_batch` for a pass run without
  gradients (with track(batch_size=N), the size given: the pass is still evaluation);
- (`backward_end` markers, after each torch.autograd.backward call, come from the session's
  backward wrapper itself, record.steps: one native call with the phase's end; here only
  their CUDA event);
- `data_start` / `data_end` markers around every DataLoader iterator's __next__ (patched
  through the session's registry): the only time analyse.throughput blames on data loading;
- when the parameters are on CUDA: a `torch.cuda.Event` at every phase boundary, resolved at
  the end (and in batches while running, so that events do not pile up), because host times
  of asynchronous kernels say nothing; GPU utilisation and memory sampled with pynvml in a
  background thread that stops with the block.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any

import numpy as np
import torch

from .. import _C

from ..stats import describe as _stats

GPU_SAMPLE_INTERVAL_S = 0.1
#: the frame of `torch.autograd.Function.apply` (a classmethod in Python over the C apply)
_FUNCTION_APPLY = torch.autograd.Function.apply.__func__.__code__


def inside_function_forward() -> bool:
    """Whether this runs inside a custom autograd Function's forward: a reentrant
    `checkpoint(model, x)` (or DeepSpeed's, fairscale's) runs the model there without
    gradients, yet the pass is the training forward (its backward recomputes it)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _FUNCTION_APPLY:
            return True
        frame = frame.f_back
    return False


_CUDA_FLUSH_EVERY = 512         # pending CUDA events resolved in batches of this size


def leading_dim(args: tuple, kwargs: dict | None = None, depth: int = 3) -> int | None:
    """Leading dimension of the first tensor among a call's arguments (searched in order,
    through lists, tuples and dicts), or None. Inside one argument the first tensor decides,
    even if it is 0-d; an argument with no sized tensor first passes to the next. Runs at
    every forward pass: a first argument that is a tensor is answered without a search."""
    if args and type(args[0]) is torch.Tensor:
        first = args[0]
        return int(first.shape[0]) if first.dim() >= 1 else None
    # the arguments are one more level, searched the same way
    return _first_leading_dim((*args, *(kwargs or {}).values()), depth + 1)


def _first_leading_dim(v, depth: int) -> int | None:
    """The leading dimension of the first tensor inside `v` (None if that one is 0-d or there
    is none), searching lists, tuples and dicts `depth` levels down."""
    if depth <= 0 or not isinstance(v, (list, tuple, dict)):
        return None
    for x in (v.values() if isinstance(v, dict) else v):
        if isinstance(x, torch.Tensor):   # the first tensor decides, even if it is 0-d
            return int(x.shape[0]) if x.dim() >= 1 else None
        found = _first_leading_dim(x, depth - 1)
        if found is not None:
            return found
    return None


class GpuSampler:
    """Samples GPU utilisation and memory with pynvml in a daemon thread until stop()."""

    def __init__(self, device_index: int, interval_s: float = GPU_SAMPLE_INTERVAL_S):
        self.device_index = int(device_index)
        self.interval_s = float(interval_s)
        self.samples: list[tuple[float, int, int, int]] = []  # t_s, util %, mem util %, used B
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self._handle = None

    def _nvml_handle(self, pynvml):
        """The NVML handle of the torch device (NVML numbers devices ignoring
        CUDA_VISIBLE_DEVICES: match by PCI bus id when torch reports it)."""
        try:
            props = torch.cuda.get_device_properties(self.device_index)
            bus = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus)
        except Exception:  # noqa: BLE001
            pass
        index = self.device_index
        try:
            index = torch.cuda._get_nvml_device_index(self.device_index)
        except Exception:  # noqa: BLE001
            pass
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    def start(self) -> None:
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = self._nvml_handle(pynvml)
        except Exception as err:  # noqa: BLE001  (no NVML: throughput still works)
            self.error = f"pynvml unavailable: {type(err).__name__}: {err}"
            self._shutdown()
            return
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="memprof-gpu-sampler",
                                        daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        pynvml, h = self._nvml, self._handle
        util = pynvml.nvmlDeviceGetUtilizationRates(h)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        self.samples.append((time.monotonic() - self._t0, int(util.gpu), int(util.memory),
                             int(mem.used)))

    def _run(self) -> None:
        try:
            while True:
                self._sample()
                if self._stop.wait(self.interval_s):
                    break
        except Exception as err:  # noqa: BLE001  (a sampler must never disturb training)
            self.error = f"sampling stopped: {type(err).__name__}: {err}"

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                self.error = "sampler thread did not stop within 5 s"
            self._thread = None
        self._shutdown()

    def _shutdown(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self._nvml = None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device_index": self.device_index,
                               "interval_s": self.interval_s, "samples": len(self.samples),
                               "error": self.error}
        if self.samples:
            a = np.array([s[1:] for s in self.samples], dtype=np.float64)
            out["utilization_pct"] = _stats(a[:, 0])
            out["memory_utilization_pct"] = _stats(a[:, 1])
            out["memory_used_bytes_max"] = int(a[:, 2].max())
        return out


def _params_on_cuda(params) -> bool:
    """CUDA events are used when the tracked parameters live on a CUDA device."""
    return any(p.is_cuda for p in params)


def _cuda_device_index(params) -> int:
    for p in params:
        if p.is_cuda:
            return p.device.index if p.device.index is not None else torch.cuda.current_device()
    return torch.cuda.current_device()


class ThroughputRecorder:
    """Markers for the step-time split; on CUDA, CUDA events at every phase boundary."""
    name = "throughput"

    def __init__(self):
        self.session = None
        self.cuda = False
        self.gpu: GpuSampler | None = None
        # CUDA timeline: [label, value, event or None]; resolved into (label, t_ns, value)
        self._pending: list[list] = []
        self._resolved: list[tuple[str, int | None, int]] = []
        self._ref_event = None
        self.cuda_error: str | None = None
        self.gpu_error: str | None = None
        # the most worker processes of a DataLoader iterated: with workers, batches arrive
        # in bursts (most steps wait ~0, every Nth the batch's whole making)
        self.loader_workers = 0

    # ------------------------------------------------------------------ install / remove
    def install(self, session) -> None:
        self.session = session
        params = session.params()
        self.cuda = _params_on_cuda(params)
        if self.cuda:   # (the forward's CUDA event first: the batch size read below follows it)
            session.scope.on_forward_start.append(
                lambda args, kwargs: self._cuda_mark("forward_start"))
            session.scope.on_forward_end.append(lambda: self._cuda_mark("forward_end"))
            session.steps.on_optimizer_pre.append(self._optimizer_pre)
            session.steps.on_step_end.append(lambda: self._cuda_mark("step"))
            session.backward.before.append(lambda t, g: self._cuda_mark("backward_start"))
            session.backward.after.append(lambda: self._cuda_mark("backward_end"))
            try:
                self.gpu = GpuSampler(_cuda_device_index(params))
                self.gpu.start()
            except Exception as err:  # noqa: BLE001  (no sampler: times are still measured)
                self.gpu = None
                self.gpu_error = f"{type(err).__name__}: {err}"
        session.scope.on_forward_start.append(self._forward_inputs)
        from torch.utils.data import dataloader
        session.patches.patch(dataloader._BaseDataLoaderIter, "__next__", self._wrap_next)

    def remove(self) -> None:
        if self.gpu is not None:
            try:
                self.gpu.stop()
            except Exception as err:  # noqa: BLE001
                self.gpu.error = f"{type(err).__name__}: {err}"

    # ------------------------------------------------------------------ hooks
    def _wrap_next(self, original):
        """Time inside the DataLoader's iterator: the only wait blamed on data loading."""
        recorder = self

        def __next__(it):
            workers = getattr(it, "_num_workers", 0)
            if workers > recorder.loader_workers:
                recorder.loader_workers = workers
            recorder._data_mark("data_start")
            try:
                return original(it)
            finally:
                recorder._data_mark("data_end")
        return __next__

    def _data_mark(self, label: str) -> None:
        if self.session is None or not _C.is_active():
            return
        self.session.steps.mark(label)
        if self.cuda:
            self._cuda_mark(label)

    def _forward_inputs(self, args, kwargs) -> None:
        """At a pass's start. A pass without gradients (a validation batch every step) is
        `eval_batch`: the training batch is the micro-step's size (a 256-row eval batch made
        it 4x its 64); a pass inside a reentrant checkpoint's Function is no evaluation."""
        label = "batch" if torch.is_grad_enabled() or inside_function_forward() \
            else "eval_batch"
        override = self.session.batch_size
        if override is None:
            n = leading_dim(args, kwargs)
        elif label == "eval_batch":   # the size is given, but the pass is still evaluation
            n = override
        else:
            return
        if n is not None:
            _C.mark(label, n)
            if self.cuda:
                self._pending.append([label, n, None])

    def _optimizer_pre(self, optimizer) -> None:
        if self.session.steps.watches(optimizer):
            self._cuda_mark("optimizer_start")

    # ------------------------------------------------------------------ CUDA events
    def _cuda_mark(self, label: str) -> None:
        try:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            if self._ref_event is None:
                self._ref_event = ev
            self._pending.append([label, self.session.step, ev])
            if len(self._pending) >= 2 * _CUDA_FLUSH_EVERY:
                self._flush(block=False)
        except Exception as err:  # noqa: BLE001
            self.cuda_error = f"{type(err).__name__}: {err}"

    def _flush(self, block: bool) -> None:
        """Resolve recorded events into ns since the first one; without block, only those
        the GPU has already passed (event.query()), so that no sync is forced."""
        if block and self._pending:
            torch.cuda.synchronize()
        done = 0
        for label, value, ev in self._pending:
            if ev is not None:
                if not block and not ev.query():
                    break
                t = int(round(self._ref_event.elapsed_time(ev) * 1e6))
            else:
                t = None
            self._resolved.append((label, t, value))
            done += 1
        del self._pending[:done]

    def _cuda_timeline(self) -> list[tuple[str, int | None, int]] | None:
        if not self.cuda or self.cuda_error:
            return None
        try:
            self._flush(block=True)
        except Exception as err:  # noqa: BLE001
            self.cuda_error = f"{type(err).__name__}: {err}"
            return None
        return list(self._resolved)

    def record(self) -> dict:
        """Plain data for analyse.throughput (saved with the profile)."""
        gpu = self.gpu.summary() if self.gpu is not None else None
        if self.gpu is None and self.gpu_error:
            gpu = {"samples": 0, "error": self.gpu_error}
        timeline = self._cuda_timeline()
        return {"cuda": self.cuda, "cuda_error": self.cuda_error,
                "cuda_timeline": [list(x) for x in timeline] if timeline else None,
                "gpu": gpu, "batch_override": self.session.batch_size,
                "loader_workers": self.loader_workers}
