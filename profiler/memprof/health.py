"""Training health (track(..., health=True)): gradient norm before and after clipping, the
learning rate of every param group at every optimizer step, how the LR scheduler is stepped
relative to the optimizer, loss per step, loss spikes, non-finite loss and gradients.

What is recorded, and how
- Gradient norm seen by the optimizer: in a global optimizer step pre-hook, the L2 norm of all
  gradients of the optimizer's parameters, as one fused computation (torch._foreach_norm, then
  the norm of the stacked per-parameter norms). On CUDA the result stays on the device and is
  copied to the host every FLUSH_EVERY records (one sync per batch, never one per parameter).
- Gradient clipping: torch.nn.utils.clip_grad_norm_ (both of its public names) is wrapped while
  tracking; its return value is the pre-clip total norm, its max_norm argument the threshold.
  clip_grad_norm_ references imported before the block are caught through the helper it calls
  (torch.nn.utils.clip_grad._clip_grads_with_norm_, public as clip_grads_with_norm_), which
  is wrapped too (the norm it is given counts as the pre-clip norm).
- Learning rate: every param group's lr at each optimizer step (pre-hook), and at every root
  forward (to see the LR change between micro-steps of one optimizer step).
- LR scheduler: LRScheduler.step (and the subclasses that override step) is wrapped while
  tracking; the constructor's initial step is not counted.
- Loss: values given to prof.log(loss=...), else the scalar roots of torch.autograd.backward
  (read with .item() on the CPU; on CUDA copied and read in batches as above); per optimizer
  step the mean over its micro-steps.

Rules (thresholds are module constants, stated in each finding):
- loss spike: step k's loss exceeds the median of the previous LOSS_WINDOW step losses (at
  least LOSS_MIN_HISTORY of them) by more than LOSS_REL_JUMP of that median AND by more than
  LOSS_Z robust standard deviations of the residuals (1.4826 x MAD of loss - rolling median
  over the run, floored at 1% of the median loss).
- clipping on every step: clipped (pre-clip norm > max_norm) in >= CLIP_ALWAYS_FRACTION of at
  least CLIP_MIN_STEPS steps; never clipped: 0 of at least CLIP_MIN_STEPS steps (info).
- clipping mismatch: the optimizer saw a norm that differs by more than CLIP_MISMATCH from
  min(pre-clip norm, max_norm) in at least half of at least 3 steps.
- scheduler before optimizer: the scheduler stepped after a forward/backward of an iteration
  and before that iteration's optimizer step in at least half of its calls (warning), or only
  before the very first optimizer step (info: the first LR value is skipped once).
- schedule per micro-step: a scheduler stepped >= 2 times per optimizer step in at least half
  of the optimizer steps, or the LR changed between the micro-steps of at least half of the
  optimizer steps with gradient accumulation.
"""
from __future__ import annotations

import functools
import math
import weakref
from typing import Any

import numpy as np
import torch

from .graph import remove_handles
from .profile import Finding, Profile

FLUSH_EVERY = 32
LOSS_WINDOW = 8
LOSS_MIN_HISTORY = 3
LOSS_REL_JUMP = 0.30
LOSS_Z = 3.5
CLIP_ALWAYS_FRACTION = 0.9
CLIP_MIN_STEPS = 5
CLIP_MISMATCH = 0.05


def _num(x) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.detach().reshape(()).item())
    return float(x)


def log_values(tracker, values: dict) -> None:
    """prof.log(**values): remember numbers for the current optimizer step."""
    step = tracker._step
    for name, v in values.items():
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"log({name}=...): expected a number or a one-element tensor, "
                                 f"got a tensor of shape {tuple(v.shape)}")
            v = _num(v)
        elif not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool):
            raise ValueError(f"log({name}=...): expected a number or a one-element tensor, got "
                             f"{type(v).__name__}")
        tracker._logs.append((step, str(name), float(v)))


class HealthRecorder:
    """The opt-in hooks and wrappers of track(health=True); every one is undone by remove()."""

    def __init__(self, tracker):
        self.tracker = weakref.proxy(tracker)  # no reference cycle with the tracker
        self.active = False
        self.grad: dict[int, dict] = {}       # step -> {"norm", "bad", "lr"}
        self.clips: list[dict] = []           # {"step", "pre", "max_norm", "norm_type"}
        self.losses: list[list] = []          # [step, value]
        self.timeline: list[tuple] = []       # ("F", step, lrs) ("B", step) ("O", step, opt_id)
        #                          ("S", step, sched_id, class, opt_id, lrs_after, lrs_before)
        self._opts: list = []                 # weakrefs of watched optimizers, in order seen
        self._pending: list[tuple] = []       # (kind, key, tensor, extra)
        self._patches: list[tuple] = []       # (owner, name, original, wrapper)
        self._handles: list = []
        self._clip_depth = 0
        self._sched_depth = 0
        self._last_ids: tuple = ()
        self._last_params: list = []
        self._names: dict[int, str] | None = None
        self.errors: list[str] = []

    def _note(self, error: str) -> None:
        if len(self.errors) < 20:   # a failure that repeats every step is reported once or so
            self.errors.append(error)

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        tr = self.tracker
        self.active = True
        from torch.optim.optimizer import register_optimizer_step_pre_hook
        self._handles.append(register_optimizer_step_pre_hook(self._opt_pre))
        if tr.model is not None:
            self._handles.append(tr.model.register_forward_pre_hook(self._root_pre))
        elif tr.auto_modules:
            from torch.nn.modules.module import register_module_forward_pre_hook
            self._handles.append(register_module_forward_pre_hook(self._auto_pre))
        tr._backward.before.append(self._before_backward)
        from torch.nn.utils import clip_grad
        clip_wrapper = None
        for owner in (torch.nn.utils, clip_grad):
            if getattr(owner, "clip_grad_norm_", None) is not None:
                if clip_wrapper is None:
                    clip_wrapper = self._wrap_clip(owner.clip_grad_norm_, inner=False)
                self._patch(owner, "clip_grad_norm_", lambda f, w=clip_wrapper: w)
        inner = None  # the second half of clip_grad_norm_, also public in torch >= 2.6
        for owner, name in ((clip_grad, "_clip_grads_with_norm_"),
                            (torch.nn.utils, "clip_grads_with_norm_")):
            if getattr(owner, name, None) is not None:
                if inner is None:
                    inner = self._wrap_clip(getattr(owner, name), inner=True)
                self._patch(owner, name, lambda f, w=inner: w)
        from torch.optim.lr_scheduler import LRScheduler
        for cls in [LRScheduler] + _subclasses(LRScheduler):
            if "step" in cls.__dict__:
                self._patch(cls, "step", self._wrap_sched)

    def _patch(self, owner, name: str, make) -> None:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        wrapper = make(original)
        setattr(owner, name, wrapper)
        self._patches.append((owner, name, original, wrapper))

    def remove(self) -> None:
        self.active = False  # wrappers that others re-wrapped stay in place, passing through
        remove_handles(self._handles)
        self.tracker._backward.detach(before=self._before_backward)
        for owner, name, original, wrapper in reversed(self._patches):
            current = owner.__dict__.get(name) if isinstance(owner, type) else \
                getattr(owner, name, None)
            if current is wrapper:
                setattr(owner, name, original)
        self._patches.clear()
        try:
            self.flush()
        except Exception as err:  # noqa: BLE001
            self._note(f"flush: {type(err).__name__}: {err}")

    # ------------------------------------------------------------------ deferred reads
    def _immediate(self, t: torch.Tensor) -> bool:
        """Host tensors are read at once; device tensors in batches (see flush)."""
        return t.device.type == "cpu"

    def _defer(self, kind: str, key, t: torch.Tensor, extra=None) -> None:
        if self._immediate(t):
            self._resolve(kind, key, t.reshape(-1).tolist(), extra)
            return
        self._pending.append((kind, key, t.detach().reshape(-1), extra))
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Copy pending device values to the host: one sync per device per batch."""
        pending, self._pending = self._pending, []
        by_dev: dict[torch.device, list] = {}
        for item in pending:
            by_dev.setdefault(item[2].device, []).append(item)
        for items in by_dev.values():
            flat = torch.cat([it[2].float() for it in items]).tolist()
            i = 0
            for kind, key, t, extra in items:
                n = t.numel()
                self._resolve(kind, key, flat[i:i + n], extra)
                i += n

    def _resolve(self, kind: str, key, vals: list[float], extra) -> None:
        if kind == "grad":
            rec = self.grad[key]
            rec["norm"] = vals[0]
            idx = int(vals[1])
            if idx >= 0 and extra is not None:
                rec["bad"] = self._param_name(extra[idx])
        elif kind == "clip":
            self.clips[key]["pre"] = vals[0]
        elif kind == "loss":
            self.losses[key][1] = float(sum(vals))

    def _param_name(self, p) -> str:
        if self._names is None:
            names: dict[int, str] = {}
            tr = self.tracker
            roots = ([("", tr.model)] if tr.model is not None else []) + \
                [(f"{type(m).__name__}." if i else "", m) for i, m in enumerate(tr._auto_roots)]
            for prefix, m in roots:
                for n, q in m.named_parameters(remove_duplicate=True):
                    names.setdefault(id(q), prefix + n)
            for ref in self._opts:
                opt = ref()
                if opt is None:
                    continue
                for gi, g in enumerate(opt.param_groups):
                    for pi, q in enumerate(g["params"]):
                        names.setdefault(id(q), f"param_groups[{gi}]['params'][{pi}]")
            self._names = names
        return self._names.get(id(p), f"<parameter of shape {tuple(p.shape)}>")

    # ------------------------------------------------------------------ hooks
    def _watched(self) -> list:
        tr = self.tracker
        if tr.optimizer is not None:
            return [tr.optimizer]
        return [o for o in (r() for r in self._opts) if o is not None]

    def _lrs(self, opts) -> list[float]:
        return [_num(g["lr"]) for o in opts for g in o.param_groups if "lr" in g]

    def _on_forward(self) -> None:
        if torch._C._current_autograd_node():
            return
        try:
            self.timeline.append(("F", self.tracker._step, tuple(self._lrs(self._watched()))))
        except Exception as err:  # noqa: BLE001
            self._note(f"forward: {type(err).__name__}: {err}")

    def _root_pre(self, module, args):
        self._on_forward()

    def _auto_pre(self, module, args):
        if len(self.tracker._auto_stack) == 1:
            self._on_forward()

    def _opt_pre(self, optimizer, args, kwargs) -> None:
        tr = self.tracker
        self.timeline.append(("O", tr._step, id(optimizer)))
        if not tr._watches(optimizer):
            return
        if not any(r() is optimizer for r in self._opts):
            self._opts.append(weakref.ref(optimizer))
            self._names = None
        try:
            self._grad_norm(optimizer, tr._step)
        except Exception as err:  # noqa: BLE001  (health must never break training)
            self._note(f"grad norm: {type(err).__name__}: {err}")

    def _grad_norm(self, opt, step: int) -> None:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        rec = {"norm": None, "bad": None, "lr": self._lrs([opt])}
        self.grad[step] = rec
        if not params:
            return
        ids = tuple(map(id, params))
        if ids == self._last_ids:
            params = self._last_params       # one list object shared by the pending records
        else:
            self._last_ids, self._last_params = ids, params
        grads = [p.grad for p in params]
        with torch.no_grad():
            try:
                norms = list(torch._foreach_norm(grads, 2.0, dtype=torch.float32))
            except Exception:  # noqa: BLE001  (sparse or unusual gradients)
                norms = [torch.linalg.vector_norm(
                    g.coalesce().values() if g.is_sparse else g, dtype=torch.float32)
                    for g in grads]
            dev = norms[0].device
            per = torch.stack([n if n.device == dev else n.to(dev) for n in norms])
            total = torch.linalg.vector_norm(per)
            if self._immediate(total):       # host: read now, look for the culprit only if bad
                rec["norm"] = float(total)
                if not math.isfinite(rec["norm"]):
                    idx = int((~torch.isfinite(per)).to(torch.int32).argmax())
                    rec["bad"] = self._param_name(params[idx])
                return
            bad = ~torch.isfinite(per)
            first = torch.where(bad.any(), bad.to(torch.int32).argmax(), -1)
            packed = torch.stack([total, first.to(torch.float32)])
        self._defer("grad", step, packed, params)

    # ------------------------------------------------------------------ wrappers
    def _before_backward(self, tensors, grad_tensors) -> None:
        """Called by the tracker's backward wrapper (graph.BackwardRecorder)."""
        if self.active:
            try:
                self._on_backward(tensors, grad_tensors)
            except Exception as err:  # noqa: BLE001
                self._note(f"backward: {type(err).__name__}: {err}")

    def _on_backward(self, tensors, grad_tensors) -> None:
        step = self.tracker._step
        self.timeline.append(("B", step))
        roots = tensors if isinstance(tensors, (list, tuple)) else [tensors]
        gts = grad_tensors if isinstance(grad_tensors, (list, tuple)) else [grad_tensors]
        scal = [t for i, t in enumerate(roots)
                if isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_floating_point()
                and (i >= len(gts) or gts[i] is None)]
        if not scal:
            return
        self.losses.append([step, None])
        with torch.no_grad():
            if all(self._immediate(t) for t in scal):
                self.losses[-1][1] = float(sum(_num(t) for t in scal))
            else:
                vals = torch.stack([t.detach().reshape(()).float().to(scal[0].device)
                                    for t in scal]).sum()
                self._defer("loss", len(self.losses) - 1, vals)

    def _wrap_clip(self, original, inner: bool):
        rec = self

        @functools.wraps(original)
        def clip(*args, **kwargs):
            if not rec.active or rec._clip_depth:
                return original(*args, **kwargs)
            rec._clip_depth += 1
            try:
                out = original(*args, **kwargs)
            finally:
                rec._clip_depth -= 1
            try:
                rec._on_clip(args, kwargs, out, inner)
            except Exception as err:  # noqa: BLE001
                rec._note(f"clip: {type(err).__name__}: {err}")
            return out
        return clip

    def _on_clip(self, args, kwargs, out, inner: bool) -> None:
        def arg(i, name, default=None):
            return args[i] if len(args) > i else kwargs.get(name, default)
        max_norm = _num(arg(1, "max_norm"))
        if inner:          # _clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
            total, norm_type = arg(2, "total_norm"), None
        else:              # clip_grad_norm_(parameters, max_norm, norm_type=2.0, ...)
            total, norm_type = out, _num(arg(2, "norm_type", 2.0))
        self.clips.append({"step": self.tracker._step, "pre": None, "max_norm": max_norm,
                           "norm_type": norm_type})
        if isinstance(total, torch.Tensor):
            self._defer("clip", len(self.clips) - 1, total.detach().float().reshape(1))
        else:
            self.clips[-1]["pre"] = float(total)

    def _wrap_sched(self, original):
        rec = self

        @functools.wraps(original)
        def step(sched, *args, **kwargs):
            if not rec.active or rec._sched_depth:
                return original(sched, *args, **kwargs)
            initial = getattr(sched, "_step_count", 1) == 0   # the constructor's own step
            opt = getattr(sched, "optimizer", None)
            before = tuple(rec._lrs([opt])) if opt is not None and not initial else ()
            rec._sched_depth += 1
            try:
                out = original(sched, *args, **kwargs)
            finally:
                rec._sched_depth -= 1
            if not initial:
                try:
                    rec._on_sched(sched, before)
                except Exception as err:  # noqa: BLE001
                    rec._note(f"scheduler: {type(err).__name__}: {err}")
            return out
        return step

    def _on_sched(self, sched, before: tuple) -> None:
        opt = getattr(sched, "optimizer", None)
        self.timeline.append(("S", self.tracker._step, id(sched), type(sched).__name__,
                              id(opt), tuple(self._lrs([opt])) if opt is not None else (),
                              before))


def _subclasses(cls) -> list[type]:
    out, stack = [], list(cls.__subclasses__())
    while stack:
        c = stack.pop()
        if c not in out:
            out.append(c)
            stack.extend(c.__subclasses__())
    return out


# --------------------------------------------------------------------------------- analysis
def loss_spikes(losses, window: int = LOSS_WINDOW, min_history: int = LOSS_MIN_HISTORY,
                rel_jump: float = LOSS_REL_JUMP, z: float = LOSS_Z) -> list[dict]:
    """Indices where the loss jumps above its causal rolling median (rule in the module doc)."""
    y = np.asarray(losses, dtype=np.float64)
    med = rolling_median(y, window, min_history)
    ok = np.isfinite(med) & np.isfinite(y)
    if not ok.any():
        return []
    resid = y[ok] - med[ok]
    sigma = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
    sigma = max(sigma, 0.01 * float(np.median(np.abs(med[ok]))), 1e-12)
    out = []
    for k in np.flatnonzero(ok):
        r = y[k] - med[k]
        base = abs(med[k])
        if base > 0 and r > rel_jump * base and r > z * sigma:
            out.append({"index": int(k), "loss": float(y[k]), "rolling_median": float(med[k]),
                        "relative_jump": float(r / base), "z": float(r / sigma)})
    return out


def rolling_median(y: np.ndarray, window: int = LOSS_WINDOW,
                   min_history: int = LOSS_MIN_HISTORY) -> np.ndarray:
    """Median of the finite values among the `window` losses before each step (causal); NaN
    where fewer than `min_history` are finite."""
    med = np.full(y.size, np.nan)
    for k in range(y.size):
        hist = y[max(0, k - window):k]
        hist = hist[np.isfinite(hist)]
        if hist.size >= min_history:
            med[k] = np.median(hist)
    return med


def loss_noise(losses, window: int = LOSS_WINDOW) -> float | None:
    """Median of |loss - causal rolling median| / rolling median: the typical step-to-step
    noise of the loss relative to its trend (None until `window` steps have a rolling median,
    i.e. with fewer than LOSS_MIN_HISTORY + window losses)."""
    y = np.asarray(losses, dtype=np.float64)
    med = rolling_median(y, window)
    ok = np.isfinite(med) & np.isfinite(y) & (med != 0)
    rel = np.abs(y[ok] - med[ok]) / np.abs(med[ok])
    return float(np.median(rel)) if rel.size >= window else None


def warmup_length(lrs) -> tuple[int | None, bool]:
    """(steps before the LR first reaches its peak, whether it got there before the end)."""
    a = np.asarray(lrs, dtype=np.float64)
    if a.size < 2 or not np.isfinite(a).all():
        return None, False
    peak = a.max()
    if peak <= 0 or a[0] >= 0.99 * peak:
        return 0, True
    i = int(np.flatnonzero(a >= 0.999 * peak)[0])
    return i, bool(i < a.size - 1)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def health_analysis(profile: Profile, tracker) -> list[Finding]:
    """Default analysis: stores profile.meta['health'] and returns the health findings."""
    rec = getattr(tracker, "_health", None) if tracker is not None else None
    logs = list(getattr(tracker, "_logs", []) or []) if tracker is not None else []
    if rec is None and not logs:
        return []
    summary, findings = _analyse(rec, logs)
    profile.meta["health"] = summary
    return findings


def summarize(profile: Profile) -> dict[str, Any] | None:
    """Training health of a profile as plain data (what `prof.health` returns), or None when
    the block ran without health=True and without prof.log()."""
    return profile.meta.get("health")


def _analyse(rec: HealthRecorder | None, logs) -> tuple[dict, list[Finding]]:
    findings: list[Finding] = []
    # ---- loss per optimizer step
    logged: dict[str, dict[int, list[float]]] = {}
    for step, name, v in logs:
        logged.setdefault(name, {}).setdefault(step, []).append(v)
    if "loss" in logged:
        per_loss = {s: float(np.mean(v)) for s, v in logged["loss"].items()}
        loss_source = "prof.log(loss=...)"
    else:
        by: dict[int, list[float]] = {}
        for step, v in (rec.losses if rec is not None else []):
            if v is not None:
                by.setdefault(step, []).append(v)
        per_loss = {s: float(np.mean(v)) for s, v in by.items()}
        loss_source = "root of backward" if per_loss else None
    grad = rec.grad if rec is not None else {}
    steps = sorted(set(per_loss) | set(grad))
    # ---- clipping per step (the last clip call of the step)
    clip_by_step: dict[int, dict] = {}
    calls_by_step: dict[int, int] = {}
    for c in (rec.clips if rec is not None else []):
        clip_by_step[c["step"]] = c
        calls_by_step[c["step"]] = calls_by_step.get(c["step"], 0) + 1
    steps = sorted(set(steps) | set(clip_by_step))
    per_step = {"step": steps,
                "loss": [per_loss.get(s) for s in steps],
                "grad_norm": [grad.get(s, {}).get("norm") for s in steps],
                "grad_norm_pre_clip": [clip_by_step[s]["pre"] if s in clip_by_step else None
                                       for s in steps],
                "max_norm": [clip_by_step[s]["max_norm"] if s in clip_by_step else None
                             for s in steps],
                "clipped": [(clip_by_step[s]["pre"] > clip_by_step[s]["max_norm"])
                            if s in clip_by_step and clip_by_step[s]["pre"] is not None
                            else None for s in steps],
                "lr": [grad.get(s, {}).get("lr") for s in steps]}
    summary: dict[str, Any] = {"enabled": rec is not None, "steps": len(steps),
                               "loss_source": loss_source, "per_step": per_step,
                               "logged": {k: {str(s): float(np.mean(v)) for s, v in d.items()}
                                          for k, d in logged.items() if k != "loss"},
                               "rules": {"loss_window": LOSS_WINDOW,
                                         "loss_relative_jump": LOSS_REL_JUMP,
                                         "loss_z": LOSS_Z,
                                         "clip_always_fraction": CLIP_ALWAYS_FRACTION}}
    if rec is not None and rec.errors:
        summary["errors"] = rec.errors[:10]

    # ---- non-finite loss / gradients
    losses = [per_loss[s] for s in sorted(per_loss)]
    loss_steps = sorted(per_loss)
    bad_loss = [s for s in loss_steps if not math.isfinite(per_loss[s])]
    if bad_loss:
        findings.append(Finding(
            kind="nonfinite_loss", severity="error", bytes=0,
            message=(f"the loss is non-finite ({per_loss[bad_loss[0]]}) from optimizer step "
                     f"{bad_loss[0]} ({len(bad_loss)} of {len(loss_steps)} steps; loss from "
                     f"{loss_source})"),
            fix=("lower the LR (or lengthen the warmup), clip gradients, check the data of "
                 f"step {bad_loss[0]} and any log/div/sqrt in the loss; under fp16 use a "
                 "GradScaler or bf16"),
            evidence={"first_step": bad_loss[0], "steps": bad_loss[:20],
                      "count": len(bad_loss)}))
    bad_grad = [s for s in sorted(grad) if grad[s]["norm"] is not None
                and not math.isfinite(grad[s]["norm"])]
    if bad_grad:
        first = grad[bad_grad[0]]
        findings.append(Finding(
            kind="nonfinite_gradients", severity="error", bytes=0,
            message=(f"non-finite gradient (norm {first['norm']}) at optimizer step "
                     f"{bad_grad[0]}, first in parameter `{first['bad']}` ({len(bad_grad)} "
                     f"optimizer step(s) in all); the optimizer applied it"),
            fix=(f"find what makes `{first['bad']}`'s gradient blow up (LR too high, a "
                 "log/sqrt/div of ~0, fp16 overflow: use GradScaler or bf16); "
                 "torch.autograd.set_detect_anomaly(True) names the op"),
            holder=first["bad"],
            evidence={"first_step": bad_grad[0], "first_parameter": first["bad"],
                      "steps": bad_grad[:20], "count": len(bad_grad)}))
    summary["nonfinite"] = {"loss_steps": bad_loss[:100], "gradient_steps": bad_grad[:100],
                            "first_parameter": grad[bad_grad[0]]["bad"] if bad_grad else None}

    # ---- loss spikes
    spikes = loss_spikes(losses)
    for sp in spikes:
        sp["step"] = loss_steps[sp.pop("index")]
    summary["loss"] = {"spikes": spikes[:50], "relative_noise": loss_noise(losses),
                       "first": losses[0] if losses else None,
                       "last": losses[-1] if losses else None,
                       "median": float(np.nanmedian(losses)) if losses and
                       np.isfinite(losses).any() else None}
    if spikes:
        worst = max(spikes, key=lambda s: s["relative_jump"])
        findings.append(Finding(
            kind="loss_spikes", severity="warning", bytes=0,
            message=(f"the loss jumped above its trend at {len(spikes)} of {len(losses)} "
                     f"optimizer steps (worst: step {worst['step']}, {_fmt(worst['loss'])} vs "
                     f"rolling median {_fmt(worst['rolling_median'])}, +"
                     f"{100 * worst['relative_jump']:.0f}%); rule: > {100 * LOSS_REL_JUMP:.0f}% "
                     f"and > {LOSS_Z} robust SD above the median of the previous {LOSS_WINDOW} "
                     "steps"),
            fix=("if grad norms spike at the same steps: lower the LR, lengthen the warmup or "
                 "clip; if not: raise the micro-batch (fewer accumulation steps, same effective "
                 "batch) and check the data of those steps"),
            evidence={"spike_steps": [s["step"] for s in spikes][:50],
                      "worst": worst, "rule": {"window": LOSS_WINDOW,
                                               "relative_jump": LOSS_REL_JUMP, "z": LOSS_Z}}))

    if rec is None:
        return summary, findings

    # ---- gradient clipping
    clip_steps = [s for s in sorted(clip_by_step) if clip_by_step[s]["pre"] is not None]
    if clip_steps:
        pre = np.array([clip_by_step[s]["pre"] for s in clip_steps], dtype=np.float64)
        mx = np.array([clip_by_step[s]["max_norm"] for s in clip_steps], dtype=np.float64)
        clipped = pre > mx
        fin = pre[np.isfinite(pre)]
        clip_sum = {"steps_with_clip": len(clip_steps), "steps_clipped": int(clipped.sum()),
                    "fraction_clipped": float(clipped.mean()),
                    "max_norm": float(np.median(mx)),
                    "pre_clip_norm": ({"median": float(np.median(fin)),
                                       "p90": float(np.percentile(fin, 90)),
                                       "max": float(fin.max())} if fin.size else None),
                    "calls_per_step_max": max(calls_by_step.values())}
        summary["clipping"] = clip_sum
        n = len(clip_steps)
        if n >= CLIP_MIN_STEPS and clipped.mean() >= CLIP_ALWAYS_FRACTION and fin.size:
            med = float(np.median(fin))
            findings.append(Finding(
                kind="grad_clip_every_step", severity="warning", bytes=0,
                message=(f"clip_grad_norm_(max_norm={_fmt(clip_sum['max_norm'])}) clipped "
                         f"{int(clipped.sum())} of {n} optimizer steps (median pre-clip norm "
                         f"{_fmt(med)}, {med / clip_sum['max_norm']:.1f}x max_norm): every "
                         "update is rescaled, the step size follows max_norm, not the LR"),
                fix=(f"set max_norm near the typical pre-clip norm (p90 "
                     f"{_fmt(clip_sum['pre_clip_norm']['p90'])}) so that it only catches "
                     "spikes, or lower the LR if the norms are large because training is "
                     "unstable"),
                evidence=dict(clip_sum)))
        elif n >= CLIP_MIN_STEPS and not clipped.any() and fin.size:
            findings.append(Finding(
                kind="grad_clip_inactive", severity="info", bytes=0,
                message=(f"clip_grad_norm_(max_norm={_fmt(clip_sum['max_norm'])}) never "
                         f"clipped in {n} optimizer steps (largest pre-clip norm "
                         f"{_fmt(float(fin.max()))}): clipping is inactive"),
                fix=("fine as a safety net; to bound updates set max_norm near the p90 "
                     f"pre-clip norm ({_fmt(clip_sum['pre_clip_norm']['p90'])})"),
                evidence=dict(clip_sum)))
        # did the optimizer step with what clipping left?
        cmp = []
        for s in clip_steps:
            c, g = clip_by_step[s], grad.get(s)
            if g is None or g["norm"] is None or c["norm_type"] not in (None, 2.0):
                continue
            if not (math.isfinite(c["pre"]) and math.isfinite(g["norm"])):
                continue
            expected = min(c["pre"], c["max_norm"])
            cmp.append((s, expected, g["norm"],
                        abs(g["norm"] - expected) > CLIP_MISMATCH * max(expected, 1e-12)))
        bad = [x for x in cmp if x[3]]
        if len(cmp) >= 3 and len(bad) >= 0.5 * len(cmp):
            s, e, o, _ = bad[0]
            findings.append(Finding(
                kind="grad_clip_mismatch", severity="warning", bytes=0,
                message=(f"the optimizer did not step with the clipped gradients in "
                         f"{len(bad)} of {len(cmp)} steps (step {s}: clipping left norm "
                         f"{_fmt(e)}, the optimizer saw {_fmt(o)})"),
                fix=("under AMP call scaler.unscale_(optimizer) before clip_grad_norm_; clip "
                     "the parameters the optimizer updates, after the last backward of the "
                     "step and before optimizer.step()"),
                evidence={"steps": [x[0] for x in bad][:20],
                          "expected_norm": [x[1] for x in bad][:20],
                          "optimizer_norm": [x[2] for x in bad][:20],
                          "tolerance": CLIP_MISMATCH}))

    # ---- learning rate and schedulers
    lr_steps = [s for s in sorted(grad) if grad[s]["lr"]]
    lr0 = [grad[s]["lr"][0] for s in lr_steps]
    warm, complete = warmup_length(lr0)
    summary["lr"] = {"first": lr0[0] if lr0 else None,
                     "peak": max(lr0) if lr0 else None,
                     "last": lr0[-1] if lr0 else None,
                     "warmup_optimizer_steps": warm, "warmup_complete": complete,
                     "param_groups": len(grad[lr_steps[0]]["lr"]) if lr_steps else 0}
    findings += _scheduler_findings(rec, summary, warm, complete)
    return summary, findings


def _scheduler_findings(rec: HealthRecorder, summary: dict, warm, complete) -> list[Finding]:
    findings: list[Finding] = []
    tl = rec.timeline
    scheds: dict[int, dict] = {}
    opt_count: dict[int, int] = {}        # optimizer id -> optimizer steps so far
    last_opt: dict[int, int] = {}         # optimizer id -> timeline index of its last step
    last_activity = -1                    # timeline index of the last forward/backward
    for i, ev in enumerate(tl):
        if ev[0] in ("F", "B"):
            last_activity = i
            continue
        if ev[0] == "O":
            opt_count[ev[2]] = opt_count.get(ev[2], 0) + 1
            last_opt[ev[2]] = i
            continue
        _, step, sid, cls, oid, lrs, before = ev
        info = scheds.setdefault(sid, {"class": cls, "opt": oid, "calls": 0, "mid": 0,
                                       "before_first": 0, "lr_after": [], "windows": {}})
        if info["calls"] == 0:
            info["lr_after"].append(before[0] if before else None)   # the value it started at
        info["calls"] += 1
        if oid not in last_opt:
            info["before_first"] += 1
        elif last_activity > last_opt[oid]:
            info["mid"] += 1          # after this iteration's forward/backward, before its step
        info["lr_after"].append(lrs[0] if lrs else None)
        w = opt_count.get(oid, 0)     # optimizer window index
        info["windows"][w] = info["windows"].get(w, 0) + 1
    opt_steps = opt_count
    # micro-steps per optimizer window (forward -> backward transitions) and LR per forward
    micro: list[int] = []
    lr_change_windows = 0
    windows_with_micro = 0
    cur_micro, last_tok, lrs_seen = 0, None, []
    for ev in tl:
        if ev[0] == "F":
            last_tok = "F"
            if ev[2]:
                lrs_seen.append(ev[2])
        elif ev[0] == "B":
            if last_tok == "F":
                cur_micro += 1
            last_tok = "B"
        elif ev[0] == "O":
            micro.append(cur_micro)
            if cur_micro > 1:
                windows_with_micro += 1
                if len(set(lrs_seen)) > 1:
                    lr_change_windows += 1
            cur_micro, last_tok, lrs_seen = 0, None, []
    micro_med = float(np.median(micro)) if micro else None
    out = []
    for sid, info in scheds.items():
        n_opt = opt_steps.get(info["opt"], 0)
        counts = list(info["windows"].values())
        per_window = [info["windows"].get(w, 0) for w in range(n_opt + 1)]
        windows_multi = sum(1 for c in per_window[1:] if c >= 2)
        lr_sched = [x for x in info["lr_after"] if x is not None]
        s_warm, s_complete = warmup_length(lr_sched) if lr_sched else (None, False)
        out.append({"class": info["class"], "calls": info["calls"], "optimizer_steps": n_opt,
                    "calls_per_optimizer_step": info["calls"] / n_opt if n_opt else None,
                    "before_optimizer_calls": info["mid"] + info["before_first"],
                    "before_first_optimizer_step": info["before_first"],
                    "warmup_scheduler_steps": s_warm})
        per_micro = n_opt >= 2 and windows_multi >= 0.5 * max(1, n_opt - 1) and max(counts) >= 2
        if per_micro:
            ratio = info["calls"] / max(1, n_opt)
            warm_txt = ""
            if s_warm and warm is not None:
                warm_txt = (f"; the warmup lasts {s_warm} scheduler steps = {warm}"
                            f"{'' if complete else '+'} optimizer steps")
            findings.append(Finding(
                kind="lr_schedule_per_micro_step", severity="warning", bytes=0,
                message=(f"{info['class']}.step() ran {info['calls']} times for {n_opt} "
                         f"optimizer steps ({ratio:.1f} per step, {_fmt(micro_med)} micro-steps "
                         f"per optimizer step): the schedule advances per micro-batch, so "
                         f"warmup and decay run {ratio:.1f}x too fast{warm_txt}"),
                fix=("call scheduler.step() once per optimizer step (inside the `if (i+1) % "
                     "accum == 0:` block, after optimizer.step()), or size warmup/total steps "
                     "in micro-steps on purpose"),
                evidence={"scheduler_steps": info["calls"], "optimizer_steps": n_opt,
                          "micro_steps_per_optimizer_step": micro_med,
                          "warmup_scheduler_steps": s_warm,
                          "warmup_optimizer_steps": warm}))
        elif (info["mid"] >= 1 and info["calls"] >= 2
              and info["mid"] + info["before_first"] >= 0.5 * info["calls"]):
            findings.append(Finding(
                kind="scheduler_before_optimizer", severity="warning", bytes=0,
                message=(f"{info['class']}.step() was called before optimizer.step() in "
                         f"{info['mid'] + info['before_first']} of {info['calls']} "
                         "iterations: each optimizer step "
                         "uses the next step's LR and the schedule's first value is never "
                         f"used (first LR applied {_fmt(summary['lr']['first'])})"),
                fix="call optimizer.step() first, then scheduler.step()",
                evidence={"scheduler_steps": info["calls"],
                          "before_optimizer": info["mid"] + info["before_first"],
                          "optimizer_steps": n_opt,
                          "first_lr_applied": summary["lr"]["first"]}))
        elif info["before_first"] > 0:
            findings.append(Finding(
                kind="scheduler_stepped_before_first_optimizer_step", severity="info",
                bytes=0,
                message=(f"{info['class']}.step() ran {info['before_first']} time(s) before "
                         "the first optimizer step (a pre-step at start-up, or a GradScaler "
                         "that skipped the first step): the schedule's first value(s) were "
                         f"skipped (first LR applied {_fmt(summary['lr']['first'])})"),
                fix=("do not pre-step the scheduler; with AMP a skipped first step is "
                     "harmless"),
                evidence={"before_first_optimizer_step": info["before_first"],
                          "first_lr_applied": summary["lr"]["first"]}))
    if (lr_change_windows and windows_with_micro >= 2
            and lr_change_windows >= 0.5 * windows_with_micro
            and not any(f.kind == "lr_schedule_per_micro_step" for f in findings)):
        findings.append(Finding(
            kind="lr_schedule_per_micro_step", severity="warning", bytes=0,
            message=(f"the learning rate changed between the micro-steps of "
                     f"{lr_change_windows} of {windows_with_micro} optimizer steps with "
                     "gradient accumulation: the LR is updated per micro-batch, so warmup and "
                     "decay are counted in micro-steps"),
            fix="update the LR once per optimizer step, counting optimizer steps, not batches",
            evidence={"windows_with_lr_change": lr_change_windows,
                      "windows_with_accumulation": windows_with_micro,
                      "micro_steps_per_optimizer_step": micro_med}))
    summary["schedulers"] = out
    summary["micro_steps_per_optimizer_step"] = micro_med
    return findings
