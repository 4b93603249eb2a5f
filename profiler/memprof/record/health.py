"""Training-health recorder (track(..., health=True)): gradient norm before and after clipping, the
learning rate of every param group at every optimizer step, how the LR scheduler is stepped
relative to the optimizer, loss per step, loss spikes, non-finite loss and gradients.

What is recorded, and how
- Gradient norm seen by the optimizer: in a global optimizer step pre-hook, the L2 norm of all
  gradients of the optimizer's parameters, as one fused computation (torch._foreach_norm, then
  the norm of the stacked per-parameter norms). On CUDA the result stays on the device and is
  copied to the host every FLUSH_EVERY records (one sync per batch, never one per parameter).
  When clip_grad_norm_ (L2) just scaled exactly these gradients on the CPU and they are the
  same since - same tensors, version counters, addresses and first and last values (the values
  catch what bypasses version counters: GradScaler's unscale_, writes through `.data`) - the
  norm is what clipping left, pre x min(1, max_norm / (pre + 1e-6)) as torch computes it: no
  second pass over every gradient (on the CPU as slow as the clip's own: ~5 % of an MLP step).
- Gradient clipping: torch.nn.utils.clip_grad_norm_ (both of its public names) is wrapped while
  tracking; its return value is the pre-clip total norm, its max_norm argument the threshold.
  clip_grad_norm_ references imported before the block are caught through the helper it calls
  (torch.nn.utils.clip_grad._clip_grads_with_norm_, public as clip_grads_with_norm_), which
  is wrapped too (the norm it is given counts as the pre-clip norm).
- The parameter a non-finite gradient came from: the optimizer pre-hook finds the first
  non-finite per-parameter norm. A clip with a NaN total multiplies every gradient by NaN, so
  there it is read from before the clip: while a total norm is computed (clip_grad_norm_,
  get_total_norm) in the tracking thread, torch._foreach_norm and torch.linalg.vector_norm pass
  through spies that note which gradients were normed, in order, and keep the stack of their
  norms that torch itself builds for the total. A clip given that very total keeps the stack
  with its record (on CUDA read in the batched copy: no extra kernel; on the CPU read only if
  the total is not finite) and names the first parameter whose norm was not finite.
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
  over the run, floored at 1% of the median loss) AND by more than LOSS_MIN_JUMP (float noise
  of a loss that reached ~0) AND by more than LOSS_TAIL_MULTIPLE x the LOSS_TAIL_QUANTILE
  quantile of the residuals before step k (at least the first LOSS_TAIL_STEPS; a lower
  quantile where there are few, leaving out LOSS_TAIL_EXCLUDED) OR by more than
  LOSS_NOISE_MULTIPLE x the largest residual n steps of exponential-tailed noise give, from
  the median and 90th percentile of the residuals (recurring spikes set the 99th percentile
  themselves): minibatch noise is skewed to the right, and a hard batch of a healthy run went
  past 3.5 robust SD.
- clipping on every step: clipped (pre-clip norm > max_norm) in >= CLIP_ALWAYS_FRACTION of at
  least CLIP_MIN_STEPS steps; never clipped: 0 of at least CLIP_MIN_STEPS steps (info).
- clipping mismatch: the optimizer saw a norm that differs by more than CLIP_MISMATCH from
  min(pre-clip norm, max_norm) in at least half of at least 3 steps.
- scheduler before optimizer: the scheduler stepped after a backward of an iteration (an
  evaluation forward does not count) and before that iteration's optimizer step in at least
  half of its calls (warning), or only before the very first optimizer step (info: the first
  LR value is skipped once).
- schedule per micro-step: a scheduler stepped >= 2 times per optimizer step in at least half
  of the optimizer steps, or the LR changed between the micro-steps of at least half of the
  optimizer steps with gradient accumulation.
"""
from __future__ import annotations

import functools
import math
import sys
import warnings
import weakref

import torch

from .clip_watch import ClippedGrads, NormCatcher, in_order, listed_parameters
from .optimizers_made import OptimizersMade
from .steps import torch_optimizer

FLUSH_EVERY = 32


#: autograd nodes of `loss / k` and `loss * (1 / k)`
_SCALING_NODES = ("DivBackward0", "MulBackward0")


def _divisor(root: torch.Tensor) -> float | None:
    """k when the backward root is `loss / k` or `loss * (1 / k)` for a plain number k (what
    gradient accumulation does: `(loss / accum).backward()`, accelerate's backward): the
    analysis undoes it when k is the number of micro-steps, so the table shows the model's
    loss. A plain number is saved by autograd as a 0-dim double or long tensor on the CPU; a
    float32 tensor divisor (`loss / loss.detach()`) is not taken, nor one that requires grad
    (`mse / (pred.var() + 1)` in float64); a long tensor (`loss / n_tokens`) is, and counts
    only if it equals the micro-steps."""
    node = root.grad_fn
    if node is None or type(node).__name__ not in _SCALING_NODES:
        return None
    other = getattr(node, "_saved_other", None)
    if not isinstance(other, torch.Tensor) or other.dim() != 0 or other.requires_grad or \
            other.dtype not in (torch.float64, torch.int64) or other.device.type != "cpu":
        return None
    k = float(other)
    if type(node).__name__ == "MulBackward0":
        k = 1.0 / k if 0.0 < k < 1.0 else 0.0
    return k if k > 1.0 and math.isfinite(k) else None


def _num(x) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.detach().reshape(()).item())
    return float(x)


class HealthRecorder:
    """The opt-in hooks and wrappers of track(health=True); every one is undone by remove()."""

    name = "health"

    def __init__(self, optimizer=None):
        self.session = None
        self.active = False
        # the block's own optimizer (a nested block records on the outer's hooks, whose
        # session may have none), and those made meanwhile: the LRs before the first step
        self._given = None if optimizer is None else weakref.ref(torch_optimizer(optimizer))
        self._made: OptimizersMade | None = None
        self._early: list[tuple] = []         # (timeline index, ((opt ref, lrs), ...))
        self.grad: dict[int, dict] = {}       # step -> {"norm", "bad", "lr"}
        self.clips: list[dict] = []           # {"step", "pre", "max_norm", "norm_type", "bad"}
        self.value_clips: list[list] = []     # [step, clip_value]: clip_grad_value_ calls
        self.losses: list[list] = []          # [step, value]
        self.loss_divisors: list = []         # per loss: the number it was divided by, or None
        self.loss_unscaled: list = []         # per loss: read before a GradScaler's scale
        self._scaled: dict[int, tuple] = {}   # id(scaled loss) -> (its weakref, the loss
        #                                        detached, what the loss was divided by)
        # ("F", step, lrs) ("B", step) ("O", step, opt_id); ("K", step, opt_id): a step
        # GradScaler skipped (inf/NaN gradients), its iteration's end
        self.timeline: list[tuple] = []
        #                          ("S", step, sched_id, class, opt_id, lrs_after, lrs_before)
        self._opts: list = []                 # weakrefs of watched optimizers, in order seen
        self._pending: list[tuple] = []       # (kind, key, tensor, extra)
        self._clip_depth = 0
        self._sched_depth = 0
        self._last_ids: tuple = ()
        self._last_params: list = []
        self._clipped: "ClippedGrads | None" = None   # what the last L2 clip left
        self._norms = NormCatcher()          # per-gradient norms of the last total norm
        self._names: dict[int, str] | None = None
        self.errors: list[str] = []

    def _note(self, error: str) -> None:
        if len(self.errors) < 20:   # a failure that repeats every step is reported once or so
            self.errors.append(error)

    # ------------------------------------------------------------------ install / remove
    def install(self, session) -> None:
        self.session = session
        self.active = True
        self._patches = session.patches
        session.steps.on_optimizer_pre.append(self._opt_pre)
        session.steps.on_skipped.append(self._skipped)
        session.scope.on_forward_start.append(lambda args, kwargs: self._on_forward())
        session.backward.before.append(self._before_backward)
        if session.optimizer is None:   # the loop's optimizer is known at its first step
            given = None if self._given is None else self._given()
            self._made = OptimizersMade([given] + session.steps.watched())
            self._made.install(session.patches)
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
        total = None  # the first half: where the per-gradient norms are computed
        for owner, name in ((clip_grad, "_get_total_norm"), (torch.nn.utils, "get_total_norm")):
            if getattr(owner, name, None) is not None:
                if total is None:
                    total = self._wrap_total_norm(getattr(owner, name))
                self._patch(owner, name, lambda f, w=total: w)
        for owner in (torch.nn.utils, clip_grad):   # clipping by value: noted, not measured
            if getattr(owner, "clip_grad_value_", None) is not None:
                self._patch(owner, "clip_grad_value_", self._wrap_clip_value)
        from torch.amp import GradScaler
        self._patch(GradScaler, "scale", self._wrap_scale)
        from torch.optim.lr_scheduler import LRScheduler
        for cls in [LRScheduler] + _subclasses(LRScheduler):
            if "step" in cls.__dict__:
                self._patch(cls, "step", self._wrap_sched)

    def _patch(self, owner, name: str, make) -> None:
        self._patches.patch(owner, name, make)

    def remove(self) -> None:
        """Switch the wrappers off (the session's patch registry restores them) and read
        what is still pending."""
        self.active = False
        try:
            self.flush()
        except Exception as err:  # noqa: BLE001
            self._note(f"flush: {type(err).__name__}: {err}")

    def record(self) -> dict:
        """Plain data for analyse.health (saved with the profile)."""
        return {"grad": [[s, r["norm"], r["bad"], r["lr"]] for s, r in sorted(self.grad.items())],
                "clips": [dict(c) for c in self.clips],
                "value_clips": [list(c) for c in self.value_clips],
                "losses": [list(x) for x in self.losses],
                "loss_divisors": list(self.loss_divisors),
                "loss_unscaled": list(self.loss_unscaled),
                "timeline": [list(ev) for ev in self.timeline],
                "errors": list(self.errors)}

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
        elif kind == "clip_norms":   # after its "clip" entry: the total is known by now
            pre = self.clips[key]["pre"]
            if pre is not None and not math.isfinite(pre):
                self._name_culprit(self.clips[key], extra, vals)
        elif kind == "loss":
            self.losses[key][1] = float(sum(vals))

    def _param_name(self, p) -> str:
        if self._names is None:
            names = self.session.scope.parameter_names()
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
        if self.session.optimizer is not None:
            return [self.session.optimizer]
        return [o for o in (r() for r in self._opts) if o is not None]

    def _lrs(self, opts) -> list[float]:
        return [_num(g["lr"]) for o in opts for g in o.param_groups if "lr" in g]

    def _on_forward(self) -> None:
        try:
            opts = self._watched()
            if not opts and self._made is not None:   # before the first step
                self._note_early()
            self.timeline.append(("F", self.session.step, tuple(self._lrs(opts))))
        except Exception as err:  # noqa: BLE001
            self._note(f"forward: {type(err).__name__}: {err}")

    def _note_early(self) -> None:
        """Every candidate optimizer's LRs at this forward; the one that steps first fills
        them in (_fill_early)."""
        made = self._made.alive()
        if made:
            self._early.append((len(self.timeline),
                                tuple((weakref.ref(o), tuple(self._lrs([o]))) for o in made)))

    def _fill_early(self, optimizer) -> None:
        for index, candidates in self._early:
            lrs = next((lrs for ref, lrs in candidates if ref() is optimizer), None)
            ev = self.timeline[index]
            if lrs is not None and ev[0] == "F" and not ev[2]:
                self.timeline[index] = ("F", ev[1], lrs)
        self._early = []

    def _skipped(self, optimizer) -> None:
        self.timeline.append(("K", self.session.step, id(optimizer)))

    def _opt_pre(self, optimizer) -> None:
        step = self.session.step
        self.timeline.append(("O", step, id(optimizer)))
        if not self.session.steps.watches(optimizer):
            return
        if not any(r() is optimizer for r in self._opts):
            self._opts.append(weakref.ref(optimizer))
            self._names = None
            if self._early:
                self._fill_early(optimizer)
            self._made = None   # the loop's optimizer is known: those made later are not noted
        try:
            self._grad_norm(optimizer, step)
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
        left = self._clipped.norm_of(grads) if self._clipped is not None else None
        if left is not None:                 # unchanged since clipping: its norm is known
            rec["norm"] = left
            return
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
        """Called by the session's backward wrapper (record.steps.BackwardHook)."""
        if self.active:
            try:
                self._on_backward(tensors, grad_tensors)
            except Exception as err:  # noqa: BLE001
                self._note(f"backward: {type(err).__name__}: {err}")

    def _on_backward(self, tensors, grad_tensors) -> None:
        step = self.session.step
        self.timeline.append(("B", step))
        roots = tensors if isinstance(tensors, (list, tuple)) else [tensors]
        gts = grad_tensors if isinstance(grad_tensors, (list, tuple)) else [grad_tensors]
        scal = [t for i, t in enumerate(roots)
                if isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_floating_point()
                and (i >= len(gts) or gts[i] is None)]
        if not scal or self.session.steps.reevaluating:   # (LBFGS's line search: not the
            return                                         # step's loss, its first is)
        # `scaler.scale(loss).backward()`: the loss is what the scaler was given (the scaled
        # one reads 65536 times larger, and inf where the loss itself was finite)
        scaled, self._scaled = self._scaled, {}
        found = [scaled.get(id(t)) for t in scal]
        found = [f if f is not None and f[0]() is t else None for t, f in zip(scal, found)]
        self.loss_unscaled.append(all(f is not None for f in found))
        divisor = None
        if len(scal) == 1:
            divisor = _divisor(scal[0]) if found[0] is None else found[0][2]
        scal = [t if f is None else f[1] for t, f in zip(scal, found)]
        self.losses.append([step, None])
        self.loss_divisors.append(divisor)
        with torch.no_grad():
            if all(self._immediate(t) for t in scal):
                self.losses[-1][1] = float(sum(_num(t) for t in scal))
            else:
                vals = torch.stack([t.detach().reshape(()).float().to(scal[0].device)
                                    for t in scal]).sum()
                self._defer("loss", len(self.losses) - 1, vals)

    def _wrap_clip_value(self, original):
        rec = self

        @functools.wraps(original)
        def clip_grad_value_(parameters, clip_value, *args, **kwargs):
            if rec.active:
                rec.value_clips.append([rec.session.step, float(clip_value)])
            return original(parameters, clip_value, *args, **kwargs)
        return clip_grad_value_

    def _wrap_scale(self, original):
        """GradScaler.scale: the loss it was given, kept (detached) until the backward of
        what it returned."""
        rec = self

        @functools.wraps(original)
        def scale(scaler, outputs):
            scaled = original(scaler, outputs)
            if rec.active and isinstance(outputs, torch.Tensor) and \
                    isinstance(scaled, torch.Tensor) and scaled is not outputs:
                rec._scaled[id(scaled)] = (weakref.ref(scaled), outputs.detach(),
                                           _divisor(outputs))
            return scaled
        return scale

    def _wrap_clip(self, original, inner: bool):
        rec = self

        @functools.wraps(original)
        def clip(*args, **kwargs):
            if not rec.active or rec._clip_depth:
                return original(*args, **kwargs)
            rec._clipped = None
            args, kwargs, params = listed_parameters(args, kwargs)
            rec._clip_depth += 1
            try:
                if inner:
                    out = original(*args, **kwargs)
                else:
                    with rec._norms.catching():
                        out = original(*args, **kwargs)
            finally:
                rec._clip_depth -= 1
            try:
                rec._on_clip(args, kwargs, out, inner, params)
            except Exception as err:  # noqa: BLE001
                rec._note(f"clip: {type(err).__name__}: {err}")
            return out
        return clip

    def _on_clip(self, args, kwargs, out, inner: bool, params: list | None) -> None:
        def arg(i, name, default=None):
            return args[i] if len(args) > i else kwargs.get(name, default)
        max_norm = _num(arg(1, "max_norm"))
        if inner:          # _clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
            total, norm_type = arg(2, "total_norm"), None
        else:              # clip_grad_norm_(parameters, max_norm, norm_type=2.0, ...)
            total, norm_type = out, _num(arg(2, "norm_type", 2.0))
        self.clips.append({"step": self.session.step, "pre": None, "max_norm": max_norm,
                           "norm_type": norm_type, "bad": None})
        caught = self._norms.take(total)   # (ids of the normed gradients, their norms) or None
        key = len(self.clips) - 1
        if isinstance(total, torch.Tensor) and not self._immediate(total):
            self._defer("clip", key, total.detach().float().reshape(1))
            if caught is not None and caught[1].device == total.device:
                # which parameter each norm is must be settled now: gradients are replaced
                # before the batched copy is read
                ordered = in_order(params, caught[0])
                if ordered is not None:
                    self._defer("clip_norms", key, caught[1].detach(), ordered)
        else:
            self.clips[-1]["pre"] = _num(total)
            if caught is not None and not math.isfinite(self.clips[-1]["pre"]):
                ordered = in_order(params, caught[0])
                if ordered is not None:
                    self._name_culprit(self.clips[-1], ordered, caught[1].tolist())
        pre = self.clips[-1]["pre"]   # known now when the norm was computed on the host
        if norm_type == 2.0 and params is not None and pre is not None and math.isfinite(pre):
            self._clipped = ClippedGrads.after(params, pre * min(1.0, max_norm / (pre + 1e-6)))

    def _name_culprit(self, clip: dict, params: list, norms: list) -> None:
        """The first parameter whose gradient norm was non-finite before the clip."""
        for p, n in zip(params, norms):
            if not math.isfinite(n):
                clip["bad"] = self._param_name(p)
                return

    def _wrap_total_norm(self, original):
        rec = self

        @functools.wraps(original)
        def total_norm(*args, **kwargs):
            if not rec.active:
                return original(*args, **kwargs)
            with rec._norms.catching():
                return original(*args, **kwargs)
        return total_norm

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
                if getattr(sched, "_step_count", 0) == 1:
                    # torch's order warnings (its first step only): at the caller's line. Not
                    # on other calls: leaving the catch resets Python's shown-once registries
                    # (the deprecated epoch argument's warning, at every call, stays at ours)
                    out = _warnings_at(sys._getframe(1), original, sched, args, kwargs)
                else:
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
        self.timeline.append(("S", self.session.step, id(sched), type(sched).__name__,
                              id(torch_optimizer(opt)),
                              tuple(self._lrs([opt])) if opt is not None else (), before))


def _subclasses(cls) -> list[type]:
    out, stack = [], list(cls.__subclasses__())
    while stack:
        c = stack.pop()
        if c not in out:
            out.append(c)
            stack.extend(c.__subclasses__())
    return out


#: where warnings re-shown by _warnings_at that did not point at memprof are shown once
_OTHERS_REGISTRY: dict = {}


def _warnings_at(caller, fn, sched, args, kwargs):
    """fn(sched, *args, **kwargs), its warnings that point at memprof's wrapper (torch's
    "lr_scheduler.step() before optimizer.step()", stacklevel=2) shown at `caller`'s line, as
    without memprof - a filter on the user's module matched memprof's instead. Others as
    they were (shown once by a registry of their own). Only on the step where torch warns of
    the order: catching costs a filter context and resets Python's shown-once registries."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(sched, *args, **kwargs)
    for w in caught:
        if w.filename == __file__:
            glob = caller.f_globals
            warnings.warn_explicit(w.message, w.category, caller.f_code.co_filename,
                                   caller.f_lineno, module=glob.get("__name__"),
                                   registry=glob.setdefault("__warningregistry__", {}),
                                   module_globals=glob)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno,
                                   registry=_OTHERS_REGISTRY, source=w.source)
    return out
