"""Throughput: step time split into data wait, forward, backward and optimizer; samples/s;
micro-steps per optimizer step (gradient accumulation, detected, not assumed); GPU utilisation.

Where the numbers come from
- Phase boundaries are the markers in the event stream: ``forward_start`` / ``forward_end``
  (root module hooks), ``backward_start`` (native, first autograd node of a backward pass),
  ``backward_end`` (written here, through the tracker's torch.autograd.backward wrapper), ``optimizer_start``
  and ``step`` (optimizer step hooks, or ``prof.step()``), ``batch`` (written here: the leading
  dimension of the first tensor passed to the root module).
- On the CPU the durations are host (steady-clock) times of those markers. When the model's
  parameters are on CUDA, a ``torch.cuda.Event`` is recorded at each boundary and durations are
  GPU-timeline differences between the events (resolved at exit, and in batches while running
  so that events do not pile up); GPU utilisation and memory are sampled with pynvml in a
  background thread that stops with the block.

Per optimizer step (the window between two ``step`` markers):
- data wait: time from the previous step boundary to the first ``forward_start``, plus, under
  gradient accumulation, the gaps between the end of one micro-step's backward and the next
  forward (fetching the next micro-batch). Unknown for the first step (no previous boundary).
- forward, backward, optimizer: summed over the micro-steps of the window;
- other: the rest of the wall time (loss computation, zero_grad, logging, ...);
- micro-steps: forward passes followed by a backward pass (a forward -> backward transition);
- samples: the micro-batch size of each micro-step, summed.
Statistics are medians with p10/p90 over the steps after ``warmup`` (default 1) warm-up steps.
"""
from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import numpy as np
import torch

from .graph import remove_handles
from .profile import Finding, Profile

WARMUP_STEPS = 1
STARVATION_FRACTION = 0.20      # median data wait / step time above which a finding is made
MIN_MEASURED_STEPS = 2
GPU_SAMPLE_INTERVAL_S = 0.1
_CUDA_FLUSH_EVERY = 512         # pending CUDA events resolved in batches of this size

PHASE_LABELS = ("forward_start", "forward_end", "backward_start", "backward_end",
                "optimizer_start", "step", "batch")
COLUMNS = ("wall_ms", "data_ms", "forward_ms", "backward_ms", "optimizer_ms", "other_ms")


# --------------------------------------------------------------------------------- recording
def leading_dim(args: tuple, kwargs: dict | None = None, depth: int = 3) -> int | None:
    """Leading dimension of the first tensor among a call's arguments (searched in order,
    through lists, tuples and dicts), or None."""
    def find(v, d):
        if isinstance(v, torch.Tensor):
            return int(v.shape[0]) if v.dim() >= 1 else None
        if d <= 0:
            return None
        if isinstance(v, (list, tuple)):
            items = v
        elif isinstance(v, dict):
            items = v.values()
        else:
            return None
        for x in items:
            if isinstance(x, torch.Tensor):  # the first tensor decides, even if it is 0-d
                return find(x, d - 1)
            r = find(x, d - 1)
            if r is not None:
                return r
        return None
    for v in list(args) + list((kwargs or {}).values()):
        if isinstance(v, torch.Tensor):
            return find(v, depth)
        r = find(v, depth)
        if r is not None:
            return r
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
    """Hooks that add `batch` and `backward_end` markers, and (CUDA) CUDA events at every
    phase boundary. Installed by track() for every block; removed on exit."""

    def __init__(self, tracker):
        self.tracker = weakref.proxy(tracker)  # no reference cycle with the tracker
        self.cuda = False
        self.gpu: GpuSampler | None = None
        self._handles: list = []
        self._orig_end_step = None
        self._in_forward = False
        # CUDA timeline: [label, value, event or None]; resolved into (label, t_ns, value)
        self._pending: list[list] = []
        self._resolved: list[tuple[str, int | None, int]] = []
        self._ref_event = None
        self.cuda_error: str | None = None
        self.gpu_error: str | None = None

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        tr = self.tracker
        params = tr._all_params()
        self.cuda = _params_on_cuda(params)
        want_batch = tr.batch_size is None
        if tr.model is not None:
            if want_batch or self.cuda:
                self._handles.append(tr.model.register_forward_pre_hook(self._root_pre,
                                                                        with_kwargs=True))
                self._handles.append(tr.model.register_forward_hook(self._root_post,
                                                                    always_call=True))
        elif tr.auto_modules:
            from torch.nn.modules.module import (register_module_forward_hook,
                                                 register_module_forward_pre_hook)
            # registered after the tracker's own global hooks: they run after it, so the
            # tracker's stack already says whether this module is the outermost one
            self._handles.append(register_module_forward_pre_hook(self._auto_pre))
            self._handles.append(register_module_forward_hook(self._auto_post, always_call=True))
        # backward_start/backward_end through the tracker's own backward wrapper
        self.tracker._backward.before.append(self._before_backward)
        self.tracker._backward.after.append(self._after_backward)
        if self.cuda:
            from torch.optim.optimizer import register_optimizer_step_pre_hook
            self._handles.append(register_optimizer_step_pre_hook(self._opt_pre))
            # prof.step() and the optimizer post hook both end a step through _end_step
            self._orig_end_step = tr._end_step

            def end_step():
                self._orig_end_step()
                self._cuda_mark("step")
            tr._end_step = end_step
            try:
                self.gpu = GpuSampler(_cuda_device_index(params))
                self.gpu.start()
            except Exception as err:  # noqa: BLE001  (no sampler: times are still measured)
                self.gpu = None
                self.gpu_error = f"{type(err).__name__}: {err}"

    def remove(self) -> None:
        remove_handles(self._handles)
        self.tracker._backward.detach(self._before_backward, self._after_backward)
        if self._orig_end_step is not None:
            self.tracker.__dict__.pop("_end_step", None)
            self._orig_end_step = None
        if self.gpu is not None:
            try:
                self.gpu.stop()
            except Exception as err:  # noqa: BLE001
                self.gpu.error = f"{type(err).__name__}: {err}"

    # ------------------------------------------------------------------ hooks
    def _before_backward(self, tensors, grad_tensors) -> None:
        if self.cuda:
            self._cuda_mark("backward_start")

    def _after_backward(self) -> None:
        self.tracker._mark("backward_end", self.tracker._step)
        if self.cuda:
            self._cuda_mark("backward_end")

    def _root_enter(self, args, kwargs) -> None:
        if torch._C._current_autograd_node():
            return  # a recomputation under checkpointing, not a new forward pass
        self._in_forward = True
        if self.cuda:
            self._cuda_mark("forward_start")
        if self.tracker.batch_size is None:
            n = leading_dim(args, kwargs)
            if n is not None:
                self.tracker._mark("batch", n)
                if self.cuda:
                    self._pending.append(["batch", n, None])

    def _root_exit(self) -> None:
        if self._in_forward:
            self._in_forward = False
            if self.cuda:
                self._cuda_mark("forward_end")

    def _root_pre(self, module, args, kwargs):
        self._root_enter(args, kwargs)

    def _root_post(self, module, args, output):
        self._root_exit()

    def _auto_pre(self, module, args):
        if len(self.tracker._auto_stack) == 1:
            self._root_enter(args, None)

    def _auto_post(self, module, args, output):
        if not self.tracker._auto_stack:
            self._root_exit()

    def _opt_pre(self, optimizer, args, kwargs):
        if self.tracker._watches(optimizer):
            self._cuda_mark("optimizer_start")

    # ------------------------------------------------------------------ CUDA events
    def _cuda_mark(self, label: str) -> None:
        try:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            if self._ref_event is None:
                self._ref_event = ev
            self._pending.append([label, self.tracker._step, ev])
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

    def cuda_timeline(self) -> list[tuple[str, int | None, int]] | None:
        if not self.cuda or self.cuda_error:
            return None
        try:
            self._flush(block=True)
        except Exception as err:  # noqa: BLE001
            self.cuda_error = f"{type(err).__name__}: {err}"
            return None
        return list(self._resolved)


# --------------------------------------------------------------------------------- analysis
def _stats(a) -> dict[str, float] | None:
    a = np.asarray([x for x in a if x is not None and np.isfinite(x)], dtype=np.float64)
    if a.size == 0:
        return None
    p10, med, p90 = np.percentile(a, [10, 50, 90])
    return {"median": float(med), "p10": float(p10), "p90": float(p90),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def phase_table(entries, batch_override: int | None = None) -> dict[str, list]:
    """Per-step phase times (ms) from time-ordered (label, t_ns, value) entries.

    One row per window that ends with a `step` entry; work after the last boundary is not a
    step. Values are None where a phase cannot be known (data wait of the first step)."""
    rows: dict[str, list] = {c: [] for c in COLUMNS + ("micro_steps", "samples",
                                                       "batch_size")}
    prev_step_t = None
    w = _Window(prev_step_t)
    for label, t, value in entries:
        if label == "batch":
            w.batch(int(value))
            continue
        if t is None:
            continue
        if label == "step":
            w.close(t)
            _append_row(rows, w, batch_override)
            prev_step_t = t
            w = _Window(prev_step_t)
        else:
            w.event(label, t)
    return rows


class _Window:
    """State machine over the markers of one optimizer step."""

    def __init__(self, start_t):
        self.start_t = start_t
        self.gap_start = start_t          # where the current data-wait gap began
        self.first_t = None
        self.state = "outside"
        self.data = 0.0 if start_t is not None else None
        self.fwd = self.bwd = self.opt = 0.0
        self.t0_fwd = self.t0_bwd = self.t0_opt = None
        self.groups: list[list] = []      # [batch or None, had_backward]
        self.last_token = None            # "F" or "B"
        self.end_t = None

    def batch(self, n: int) -> None:
        if self.groups and self.groups[-1][0] is None:
            self.groups[-1][0] = n

    def event(self, label: str, t: int) -> None:
        if self.first_t is None:
            self.first_t = t
        if label == "forward_start":
            if self.state == "backward" and self.t0_bwd is not None:
                self.bwd += t - self.t0_bwd       # no backward_end seen: ends here
                self.t0_bwd = None
            elif self.gap_start is not None and self.state in ("outside", "after_backward"):
                self.data = (self.data or 0.0) + (t - self.gap_start)
            if self.last_token != "F":
                self.groups.append([None, False])
            self.last_token = "F"
            self.state = "forward"
            self.t0_fwd = t
            self.gap_start = None
        elif label == "forward_end":
            if self.t0_fwd is not None:
                self.fwd += t - self.t0_fwd
                self.t0_fwd = None
            self.state = "after_forward"
        elif label == "backward_start":
            if self.last_token == "F" and self.groups:
                self.groups[-1][1] = True
            self.last_token = "B"
            if self.t0_bwd is None:
                self.t0_bwd = t
            self.state = "backward"
        elif label == "backward_end":
            if self.t0_bwd is not None:
                self.bwd += t - self.t0_bwd
                self.t0_bwd = None
            self.state = "after_backward"
            self.gap_start = t
        elif label == "optimizer_start":
            if self.t0_bwd is not None:
                self.bwd += t - self.t0_bwd
                self.t0_bwd = None
            self.t0_opt = t
            self.state = "optimizer"
            self.gap_start = None

    def close(self, t: int) -> None:
        if self.t0_opt is not None:
            self.opt += t - self.t0_opt
        elif self.t0_bwd is not None:     # prof.step() right after a backward
            self.bwd += t - self.t0_bwd
        self.end_t = t


def _append_row(rows, w: _Window, batch_override) -> None:
    start = w.start_t if w.start_t is not None else w.first_t
    wall = (w.end_t - start) if start is not None else None
    ms = 1e-6
    rows["wall_ms"].append(wall * ms if wall is not None else None)
    rows["data_ms"].append(w.data * ms if w.data is not None else None)
    rows["forward_ms"].append(w.fwd * ms)
    rows["backward_ms"].append(w.bwd * ms)
    rows["optimizer_ms"].append(w.opt * ms)
    known = w.fwd + w.bwd + w.opt + (w.data or 0.0)
    rows["other_ms"].append(max(0.0, wall - known) * ms if wall is not None else None)
    trained = [g for g in w.groups if g[1]]
    groups = trained if trained else w.groups
    rows["micro_steps"].append(len(groups))
    if batch_override is not None:
        sizes = [batch_override] * len(groups)
    else:
        sizes = [g[0] for g in groups]
    known_sizes = [s for s in sizes if s is not None]
    if groups and len(known_sizes) == len(sizes):
        rows["samples"].append(int(sum(known_sizes)))
        rows["batch_size"].append(float(np.median(known_sizes)))
    else:
        rows["samples"].append(None)
        rows["batch_size"].append(None)


def _entries_from_profile(profile: Profile) -> list[tuple[str, int, int]]:
    return [(m["label"], m["t_ns"], m["value"]) for m in profile.markers()
            if m["label"] in PHASE_LABELS]


def compute(entries, *, clock: str, warmup: int = WARMUP_STEPS,
            batch_override: int | None = None, gpu: dict | None = None) -> dict[str, Any]:
    """The throughput summary (plain data) from time-ordered (label, t_ns, value) entries."""
    rows = phase_table(entries, batch_override)
    n = len(rows["wall_ms"])
    keep = list(range(min(warmup, n), n))
    pick = {k: [v[i] for i in keep] for k, v in rows.items()}
    stats = {k: _stats(pick[k]) for k in COLUMNS}
    frac = [d / w for d, w in zip(pick["data_ms"], pick["wall_ms"])
            if d is not None and w]
    stats["data_fraction"] = _stats(frac)
    sps = [s / (w * 1e-3) for s, w in zip(pick["samples"], pick["wall_ms"])
           if s is not None and w]
    stats["samples_per_s"] = _stats(sps)
    micro = [m for m in pick["micro_steps"]]
    micro_med = float(np.median(micro)) if micro else None
    total_s = sum(s for s, w in zip(pick["samples"], pick["wall_ms"]) if s is not None and w)
    total_w = sum(w for s, w in zip(pick["samples"], pick["wall_ms"]) if s is not None and w)
    bs = [b for b in pick["batch_size"] if b is not None]
    return {
        "clock": clock,
        "warmup_steps_excluded": min(warmup, n),
        "steps": n,
        "steps_measured": len(keep),
        "micro_steps_per_step": micro_med,
        "gradient_accumulation": bool(micro_med is not None and micro_med > 1),
        "batch_size": float(np.median(bs)) if bs else None,
        "batch_size_source": ("track(batch_size=...)" if batch_override is not None
                              else "leading dimension of the root module's first input"),
        "samples_per_s_overall": (total_s / (total_w * 1e-3)) if total_w else None,
        "stats": stats,
        "per_step": {k: [_round(x) for x in v] for k, v in rows.items()},
        "gpu": gpu,
        "starvation_threshold": STARVATION_FRACTION,
    }


def _round(x):
    return round(float(x), 4) if isinstance(x, (float, np.floating)) else x


def summarize(profile: Profile, warmup: int | None = None) -> dict[str, Any]:
    """Throughput of a profile as plain data (what `prof.throughput` returns).

    Uses what track() stored in profile.meta["throughput"] (CUDA-event times on a GPU) unless a
    different `warmup` is asked for, then recomputes from the markers (host clock)."""
    stored = profile.meta.get("throughput")
    if stored and (warmup is None or warmup == stored.get("warmup_steps_excluded")):
        return stored
    batch = stored.get("batch_override") if stored else None
    out = compute(_entries_from_profile(profile), clock="host",
                  warmup=WARMUP_STEPS if warmup is None else int(warmup),
                  batch_override=batch, gpu=stored.get("gpu") if stored else None)
    out["batch_override"] = batch
    return out


def starvation_findings(summary: dict) -> list[Finding]:
    frac = (summary.get("stats") or {}).get("data_fraction")
    if not frac or summary.get("steps_measured", 0) < MIN_MEASURED_STEPS:
        return []
    if frac["median"] <= STARVATION_FRACTION:
        return []
    st = summary["stats"]
    data, wall = st["data_ms"], st["wall_ms"]
    clock = ("GPU idle time between steps (CUDA events)" if summary["clock"] == "cuda_events"
             else "host time")
    return [Finding(
        kind="data_loader_starvation", severity="warning", bytes=0,
        message=(f"the training loop waits for data {100 * frac['median']:.0f}% of each step "
                 f"(median {data['median']:.1f} ms of {wall['median']:.1f} ms, p90 "
                 f"{100 * frac['p90']:.0f}%; {clock}, over {summary['steps_measured']} steps "
                 f"after {summary['warmup_steps_excluded']} warm-up step(s); threshold "
                 f"{100 * STARVATION_FRACTION:.0f}% of the median step)"),
        fix=("DataLoader(num_workers=N (about the CPU cores per GPU), pin_memory=True with "
             ".to(device, non_blocking=True), persistent_workers=True, prefetch_factor=4); "
             "move per-sample decoding/augmentation out of the training loop"),
        evidence={"data_fraction_median": frac["median"], "data_fraction_p90": frac["p90"],
                  "data_ms_median": data["median"], "step_ms_median": wall["median"],
                  "threshold": STARVATION_FRACTION, "steps": summary["steps_measured"],
                  "warmup_steps_excluded": summary["warmup_steps_excluded"],
                  "clock": summary["clock"]})]


def throughput_analysis(profile: Profile, tracker) -> list[Finding]:
    """Default analysis: stores the summary in profile.meta['throughput'], checks starvation."""
    rec = getattr(tracker, "_throughput", None) if tracker is not None else None
    batch = getattr(tracker, "batch_size", None) if tracker is not None else None
    gpu = rec.gpu.summary() if rec is not None and rec.gpu is not None else None
    if rec is not None and rec.gpu is None and rec.gpu_error:
        gpu = {"samples": 0, "error": rec.gpu_error}
    timeline = rec.cuda_timeline() if rec is not None else None
    if timeline:
        summary = compute(timeline, clock="cuda_events", batch_override=batch, gpu=gpu)
    else:
        summary = compute(_entries_from_profile(profile), clock="host", batch_override=batch,
                          gpu=gpu)
        if rec is not None and rec.cuda:
            summary["note"] = f"CUDA events unavailable ({rec.cuda_error}); host clock used"
    summary["batch_override"] = batch
    profile.meta["throughput"] = summary
    return starvation_findings(summary)
