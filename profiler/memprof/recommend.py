"""`memprof.recommend`: what fits on a GPU you may not have, and how fast it would run (estimated).

    plan = memprof.recommend(model="dcal-vit-b16", gpu="v100-16gb", effective_batch=16)
    plan.best                      # Option(micro_batch, accumulation, checkpointing, precision, ...)
    plan.max_micro_batch(precision="fp16", checkpointing="every")
    plan.predict(6, precision="fp16", checkpointing="every")
    print(plan.code())             # how to apply the best option

    memprof recommend --gpu v100-16gb --model dcal-vit-b16 --effective-batch 16

Every number is an ESTIMATE (fake-tensor steps, `memprof.estimate`), never a measurement:

* For each precision the GPU supports x checkpointing policy, one training step is estimated
  at two small micro-batches (2 and 4). Every allocation of the step is affine in the batch, so
  the two event streams give the stream at any micro-batch exactly when both runs dispatched the
  same ops (checked; otherwise peaks are interpolated linearly). The caching-allocator model
  replays the synthesized stream for the reserved bytes. The largest micro-batch that fits is
  then confirmed by estimating a step at that boundary (and the model refitted if it disagrees).
* Memory is the steady state: optimizer state exists from the start of the step, and with
  gradient accumulation (accumulation > 1) the gradients too (micro-steps 2..A).
* Fits: predicted reserved bytes <= `memprof.gpus.usable_bytes(gpu)` = total memory - CUDA
  context and kernels (`gpus.DEFAULT_OVERHEAD_BYTES`) - a margin (`gpus.FIT_MARGIN`, 5 % of
  the total) for what the estimate does not see (cuBLAS/cuDNN workspaces, ...).
* Throughput: time of a micro-step = counted FLOPs (incl. recompute) / (peak FLOP/s of the
  precision x UTILISATION[precision]) + bytes moved / (bandwidth x BANDWIDTH_UTILISATION),
  where bytes moved = 2 x bytes allocated in forward and backward (each new tensor written once
  and read at least once) + 3 x parameter bytes (weights read in forward and backward,
  gradients written); at least LAUNCH_S per dispatched op. An optimizer step moves
  3 x (parameters + gradients + optimizer state). samples/s = effective batch /
  (accumulation x micro-step time + optimizer-step time). The utilisation figures are stated
  assumptions (typical of large training GEMMs), not measurements: use the ranking, and
  measure the chosen configuration (memprof.track + memprof.throughput).
* Learning rate: scaled for the effective batch from base_lr/base_batch (linear rule; the
  square-root rule is given for Adam-style optimizers), warmup converted to optimizer steps.
"""
from __future__ import annotations

import ast
import importlib
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from . import gpus as _gpus
from .checkpoint import find_blocks, parse_policy, policies_for
from .estimate import PRECISIONS, BatchModel, Estimator, optimizer_kind

__all__ = ["recommend", "Plan", "Option", "LRAdvice", "add_cli", "recommend_cli_demo",
           "UTILISATION", "BANDWIDTH_UTILISATION", "LAUNCH_S", "DEFAULT_POLICIES"]

GiB = 1 << 30
#: share of the precision's peak FLOP/s that the counted FLOPs are assumed to run at
UTILISATION = {"fp32": 0.6, "tf32": 0.5, "fp16": 0.4, "bf16": 0.4}
#: share of the memory bandwidth that the bytes moved are assumed to run at
BANDWIDTH_UTILISATION = 0.7
#: lower bound on the time per dispatched op (kernel launch and Python overhead), seconds
LAUNCH_S = 5e-6
DEFAULT_POLICIES = ("none", "every", "every-2", "selective")
FIT_BATCHES = (2, 4)


class _UserError(ValueError):
    """Bad input: printed as one line by the CLI."""


# ------------------------------------------------------------------------------ results
@dataclass
class Option:
    """One configuration: micro_batch x accumulation = effective batch (all numbers estimated)."""
    micro_batch: int
    accumulation: int
    checkpointing: str
    precision: str
    peak_allocated: int          # bytes, steady state
    peak_reserved: int           # bytes, caching-allocator model
    headroom: int                # usable bytes - peak_reserved (negative: does not fit)
    fits: bool
    samples_per_s: float | None  # estimated throughput (None: GPU FLOP/s unknown)
    step_time_s: float | None    # estimated time of one optimizer step (all micro-steps)
    flops_per_sample: float      # counted FLOPs of a training step per sample, incl. recompute
    confirmed: bool = False      # an estimate was run at this very micro-batch
    estimated: bool = True

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        return (f"{self.precision}, checkpointing {self.checkpointing}, micro-batch "
                f"{self.micro_batch} x {self.accumulation}")


@dataclass
class LRAdvice:
    base_lr: float
    base_batch: int
    effective_batch: int
    optimizer_kind: str          # 'adam' or 'sgd'
    linear_lr: float
    sqrt_lr: float
    recommended_lr: float
    rule: str
    lr: float | None = None
    ratio: float | None = None   # lr / recommended_lr
    warning: str | None = None

    def lines(self) -> list[str]:
        k = self.effective_batch / self.base_batch
        out = [f"learning rate for effective batch {self.effective_batch}: "
               f"{self.recommended_lr:.4g} = base_lr {self.base_lr:g} x {self.effective_batch} / "
               f"{self.base_batch} (linear rule, k = {k:g})"]
        if self.optimizer_kind == "adam":
            out.append(f"  Adam-style optimizer: the square-root rule gives {self.sqrt_lr:.4g} = "
                       f"{self.base_lr:g} x sqrt({k:g}); papers with Adam often scale linearly "
                       "(e.g. DCAL: 5e-4 / 512 x batch) - keep the rule of the recipe you follow")
        if self.warning:
            out.append(f"  WARNING: {self.warning}")
        elif self.lr is not None:
            r = self.lr / self.linear_lr
            if max(r, 1 / r) <= 4:
                out.append(f"  your lr {self.lr:g} = {r:.2g} x the linearly scaled value "
                           "(within 4x)")
            else:
                out.append(f"  your lr {self.lr:g} = {r:.2g} x the linearly scaled value, "
                           f"{self.lr / self.sqrt_lr:.2g} x the square-root-scaled one (within "
                           "4x of the Adam-style rule)")
        return out


def lr_advice(base_lr: float, base_batch: int, effective_batch: int, optimizer="adamw",
              lr: float | None = None) -> LRAdvice:
    """Scale base_lr (tuned at base_batch) to effective_batch; warn when lr is > 4x off."""
    if base_lr is None or base_batch is None:
        raise _UserError("base_lr and base_batch go together (the LR a recipe used at its batch)")
    if not base_lr > 0 or int(base_batch) < 1:
        raise _UserError(f"base_lr / base_batch: expected positive numbers, got {base_lr}, "
                         f"{base_batch}")
    k = effective_batch / base_batch
    kind = optimizer_kind(optimizer)
    linear, sqrt_ = base_lr * k, base_lr * math.sqrt(k)
    adv = LRAdvice(base_lr=float(base_lr), base_batch=int(base_batch),
                   effective_batch=int(effective_batch), optimizer_kind=kind, linear_lr=linear,
                   sqrt_lr=sqrt_, recommended_lr=linear, rule="linear", lr=lr)
    if lr is not None:
        if not lr > 0:
            raise _UserError(f"lr: expected a positive learning rate, got {lr}")
        adv.ratio = lr / linear
        far_linear = max(adv.ratio, 1 / adv.ratio) > 4
        far_sqrt = max(lr / sqrt_, sqrt_ / lr) > 4
        if far_linear and (kind == "sgd" or far_sqrt):
            direction = "smaller" if lr < linear else "larger"
            factor = max(adv.ratio, 1 / adv.ratio)
            adv.warning = (f"lr {lr:g} is {factor:.0f}x {direction} than the linearly scaled "
                           f"{linear:.4g} (per-sample lr {lr / effective_batch:.3g} vs "
                           f"{base_lr / base_batch:.3g} in the base recipe)")
    return adv


def warmup_advice(warmup_steps: int, accumulation: int, effective_batch: int) -> dict:
    """Warmup given in micro-steps (batches the loader yields) -> optimizer steps."""
    opt_steps = math.ceil(warmup_steps / accumulation)
    return {
        "warmup_micro_steps": int(warmup_steps), "accumulation": int(accumulation),
        "warmup_optimizer_steps": opt_steps,
        "formula": f"warmup_optimizer_steps = ceil(warmup_micro_steps / accumulation) = "
                   f"ceil({warmup_steps} / {accumulation}) = {opt_steps}",
        "note": (f"a scheduler stepped once per optimizer.step() needs {opt_steps} warmup steps; "
                 f"if {warmup_steps} already counts optimizer steps, it spans "
                 f"{warmup_steps * effective_batch} samples ({warmup_steps} x effective batch "
                 f"{effective_batch})"),
    }


@dataclass
class _Combo:
    precision: str
    checkpointing: str
    model: BatchModel | None = None
    max_micro_batch: int = 0
    confirmed_at: int | None = None
    confirm_agreed: bool | None = None
    skipped: str | None = None
    error: str | None = None
    state_bytes: int = 0
    wall_s: float = 0.0


class Plan:
    """The result of `recommend`: ranked options plus how they were obtained."""

    def __init__(self, *, gpu, effective_batch, combos, usable, assumptions, model_desc,
                 estimator, lr=None, warmup=None, container=None, wall_s=0.0, estimates=0):
        self.gpu = gpu
        self.effective_batch = effective_batch
        self._combos: dict[tuple[str, str], _Combo] = combos
        self.usable_bytes = usable
        self.assumptions = assumptions
        self.model = model_desc
        self.optimizer = estimator.optimizer_name
        self.params_bytes = estimator.params_bytes
        self.trainable_params = estimator.trainable_params
        self.total_params = estimator.total_params
        self.lr = lr
        self._warmup_steps = warmup
        self.container = container
        self.wall_s = wall_s
        self.estimates = estimates
        self.options: list[Option] = []
        for c in combos.values():
            if c.model is None:
                continue
            for m in _divisors(effective_batch):
                self.options.append(self._option(c, m, effective_batch // m))
        self.options.sort(key=_rank_key)

    # -------------------------------------------------------------- queries
    @property
    def best(self) -> Option | None:
        return next((o for o in self.options if o.fits), None)

    @property
    def warmup(self) -> dict | None:
        if self._warmup_steps is None:
            return None
        acc = self.best.accumulation if self.best is not None else 1
        return warmup_advice(self._warmup_steps, acc, self.effective_batch)

    def _combo(self, precision: str, checkpointing: str) -> _Combo:
        key = (precision, checkpointing)
        if key not in self._combos:
            raise ValueError(f"precision/checkpointing: {precision!r}/{checkpointing!r} was not "
                             f"part of this plan; it has {sorted(self._combos)}")
        c = self._combos[key]
        if c.model is None:
            raise ValueError(f"{precision}/{checkpointing} was not estimated: "
                             f"{c.error or c.skipped}")
        return c

    def max_micro_batch(self, precision: str = "fp32", checkpointing: str = "none") -> int:
        """Largest micro-batch whose step fits when gradients are accumulated across
        micro-steps (the general case; 0 = not even 1 fits). Estimated."""
        return self._combo(precision, checkpointing).max_micro_batch

    def predict(self, micro_batch: int, precision: str = "fp32", checkpointing: str = "none",
                accumulation: int | None = None) -> Option:
        """A predicted step for any micro-batch of an estimated precision x policy (default
        accumulation: effective batch / micro-batch, at least 1)."""
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"micro_batch: expected an int >= 1, got {micro_batch!r}")
        acc = accumulation if accumulation is not None else \
            max(1, math.ceil(self.effective_batch / micro_batch))
        return self._option(self._combo(precision, checkpointing), micro_batch, acc)

    def _option(self, c: _Combo, m: int, acc: int) -> Option:
        p = c.model.predict(m, acc)
        t_micro = _micro_step_time(p, self.gpu, c.precision, self.params_bytes)
        t_opt = _optimizer_time(self.gpu, self.params_bytes, self.trainable_params,
                                c.state_bytes)
        step = None if t_micro is None else acc * t_micro + t_opt
        headroom = self.usable_bytes - p.peak_reserved
        return Option(micro_batch=m, accumulation=acc, checkpointing=c.checkpointing,
                      precision=c.precision, peak_allocated=p.peak_allocated,
                      peak_reserved=p.peak_reserved, headroom=headroom, fits=headroom >= 0,
                      samples_per_s=None if step is None else m * acc / step,
                      step_time_s=step, flops_per_sample=p.flops / m,
                      confirmed=c.confirmed_at == m)

    # -------------------------------------------------------------- output
    def as_dict(self) -> dict:
        combos = []
        for (prec, pol), c in self._combos.items():
            combos.append({"precision": prec, "checkpointing": pol,
                           "max_micro_batch": c.max_micro_batch if c.model else None,
                           "confirmed_at": c.confirmed_at, "confirm_agreed": c.confirm_agreed,
                           "exact_interpolation": c.model.exact if c.model else None,
                           "skipped": c.skipped, "error": c.error, "wall_s": round(c.wall_s, 3)})
        best = self.best
        return {
            "estimated": True,
            "gpu": {"name": self.gpu.name, "memory_bytes": self.gpu.memory_bytes,
                    "usable_bytes": self.usable_bytes},
            "model": self.model, "optimizer": self.optimizer,
            "effective_batch": self.effective_batch,
            "parameters": self.total_params, "trainable_parameters": self.trainable_params,
            "checkpoint_blocks": self.container,
            "best": best.as_dict() if best else None,
            "options": [o.as_dict() for o in self.options],
            "combinations": combos,
            "lr": asdict(self.lr) if self.lr else None,
            "warmup": self.warmup,
            "assumptions": self.assumptions,
            "code": self.code() if best else None,
            "wall_s": round(self.wall_s, 3), "estimates_run": self.estimates,
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.as_dict(), indent=indent, default=str)

    def code(self, option: Option | None = None) -> str:
        """Python that applies `option` (default: the best one)."""
        o = option or self.best
        if o is None:
            return "# nothing fits: see the table (smaller effective batch, bigger GPU)"
        lines = ["import torch, memprof"]
        if self.model.get("builtin"):
            extra = "".join(f", {k}={v!r}" for k, v in self.model.get("kwargs", {}).items())
            lines.append(f"model, make_batch, loss_fn = memprof.models.build_model("
                         f"{self.model['name']!r}{extra})")
        else:
            lines.append(f"model = {self.model['name']}  # your model")
        lines.append("model.cuda().train()")
        if o.checkpointing != "none":
            where = f"{self.container or 'repeated blocks'}"
            lines.append(f"handle = memprof.checkpoint.apply(model, {o.checkpointing!r})"
                         f"  # checkpoints {where}")
        lr = self.lr.recommended_lr if self.lr else None
        lines.append(f"opt = {_optimizer_code(self.optimizer, lr)}")
        low = o.precision in ("fp16", "bf16")
        call = self.model.get("call", "model(x)")
        if o.precision == "fp16":
            lines.append('scaler = torch.amp.GradScaler("cuda")')
        lines.append(f"accumulation = {o.accumulation}  # micro-batch {o.micro_batch} x "
                     f"{o.accumulation} = effective batch {o.micro_batch * o.accumulation}")
        lines.append(f"for i, (x, y) in enumerate(loader):  # loader batch_size={o.micro_batch}")
        ind = "    "
        if low:
            dtype = "torch.float16" if o.precision == "fp16" else "torch.bfloat16"
            extra = ", cache_enabled=False" if o.checkpointing == "selective" else ""
            lines.append(f'{ind}with torch.autocast("cuda", dtype={dtype}{extra}):')
            lines.append(f"{ind}    loss = loss_fn({call}, y) / accumulation")
        else:
            lines.append(f"{ind}loss = loss_fn({call}, y) / accumulation")
        if o.precision == "fp16":
            lines.append(f"{ind}scaler.scale(loss).backward()")
        else:
            lines.append(f"{ind}loss.backward()")
        lines.append(f"{ind}if (i + 1) % accumulation == 0:")
        if o.precision == "fp16":
            lines.append(f"{ind}    scaler.step(opt); scaler.update()")
        else:
            lines.append(f"{ind}    opt.step()")
        lines.append(f"{ind}    opt.zero_grad(set_to_none=True)")
        lines.append(f"{ind}    scheduler.step()  # LR schedule and warmup count optimizer steps")
        return "\n".join(lines)

    def print(self, console=None, all_options: bool = False) -> None:
        """Rich table of the options plus LR / warmup advice and the code for the best."""
        from rich import box
        from rich.console import Console
        from rich.syntax import Syntax
        from rich.table import Table
        console = console or Console()
        g = self.gpu
        title = (f"What fits: {self.model['name']} on {g.name} ({g.memory_bytes / GiB:.2f} GiB, "
                 f"usable {self.usable_bytes / GiB:.2f} GiB), effective batch "
                 f"{self.effective_batch} - ESTIMATES, memory in GiB")
        t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
        for col in ("#", "prec", "checkpoint", "micro x acc", "alloc", "reserved",
                    "headroom", "fits", "samples/s*"):
            t.add_column(col, justify="left" if col in ("prec", "checkpoint", "fits")
                         else "right", no_wrap=True)
        rows = self.options if all_options else self._summary_rows()
        for i, o in enumerate(rows, 1):
            style = None if o.fits else "dim"
            t.add_row(str(i) if o.fits else "-", o.precision, o.checkpointing,
                      f"{o.micro_batch} x {o.accumulation}", f"{o.peak_allocated / GiB:.2f}",
                      f"{o.peak_reserved / GiB:.2f}", f"{o.headroom / GiB:+.2f}",
                      "[green]yes[/]" if o.fits else "[red]no[/]",
                      "-" if o.samples_per_s is None else f"{o.samples_per_s:.1f}",
                      style=style)
        console.print(t)
        mx = []
        for (prec, pol), c in self._combos.items():
            if c.model is not None:
                mx.append(f"{prec}/{pol}: {c.max_micro_batch}")
            else:
                mx.append(f"{prec}/{pol}: {c.skipped or c.error}")
        console.print("max micro-batch (with gradient accumulation): " + "; ".join(mx))
        a = self.assumptions
        console.print(
            f"[dim]Estimates: fake-tensor training steps ({self.estimates} run, "
            f"{self.wall_s:.1f} s), steady state; fits = reserved <= usable = total - "
            f"{a['overhead_bytes'] / 2**20:.0f} MiB CUDA context - {a['margin']:.0%} margin; "
            f"samples/s assume {', '.join(f'{k} {v:.0%}' for k, v in a['utilisation'].items() if k in self._precisions())} "
            f"of peak FLOP/s and {a['bandwidth_utilisation']:.0%} of bandwidth "
            "(* assumptions, not measurements).[/]")
        best = self.best
        if best is None:
            console.print("[red]Nothing fits[/]: lower the effective batch per GPU or use a GPU "
                          "with more memory.")
        else:
            console.print(f"[bold]Best (estimated)[/]: {best.label}: "
                          f"{best.peak_reserved / GiB:.2f} GiB reserved, "
                          + ("" if best.samples_per_s is None else
                             f"~{best.samples_per_s:.1f} samples/s"))
            console.print(Syntax(self.code(), "python", theme="ansi_dark", word_wrap=True))
        if self.lr is not None:
            for line in self.lr.lines():
                console.print(("[yellow]" + line + "[/]") if "WARNING" in line else line)
        w = self.warmup
        if w is not None:
            console.print(f"warmup: {w['formula']}")
            console.print(f"  {w['note']}")

    def _precisions(self) -> set:
        return {p for p, _ in self._combos}

    def _summary_rows(self) -> list[Option]:
        """Per precision x policy: the largest fitting micro-batch and the next one up."""
        rows = []
        for c in self._combos.values():
            if c.model is None:
                continue
            mine = sorted((o for o in self.options if o.precision == c.precision
                           and o.checkpointing == c.checkpointing), key=lambda o: o.micro_batch)
            fit = [o for o in mine if o.fits]
            if fit:
                rows.append(fit[-1])
            over = [o for o in mine if not o.fits and (not fit or o.micro_batch > fit[-1]
                                                       .micro_batch)]
            if over:
                rows.append(over[0])
        return sorted(rows, key=_rank_key)

    def __repr__(self) -> str:
        b = self.best
        return (f"Plan(gpu={self.gpu.name!r}, effective_batch={self.effective_batch}, "
                f"options={len(self.options)}, best={b.label if b else None!r})")


def _rank_key(o: Option):
    return (not o.fits, -(o.samples_per_s or 0.0), -o.micro_batch)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _optimizer_code(opt, lr) -> str:
    lr_s = f"{lr:.4g}" if lr is not None else "lr"
    if isinstance(opt, str):
        name = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}.get(opt.lower(), opt)
        extra = ", momentum=0.9" if opt.lower() == "sgd" else ""
        return f"torch.optim.{name}(model.parameters(), lr={lr_s}{extra})"
    return f"make_optimizer(model.parameters())  # lr={lr_s}"


# ------------------------------------------------------------------------------ time model
def _flops_rate(gpu, precision: str) -> float | None:
    try:
        peak = gpu.peak_flops(precision)
    except Exception:  # noqa: BLE001
        peak = None
    if peak is None:
        return None
    return peak * UTILISATION.get(precision, 0.4)


def _micro_step_time(pred, gpu, precision: str, params_bytes: int) -> float | None:
    rate = _flops_rate(gpu, precision)
    if rate is None or not gpu.bandwidth:
        return None
    t_flops = pred.flops / rate
    moved = 2 * pred.bytes_allocated + 3 * params_bytes
    t_mem = moved / (gpu.bandwidth * BANDWIDTH_UTILISATION)
    return max(t_flops + t_mem, pred.ops * LAUNCH_S)


def _optimizer_time(gpu, params_bytes: int, trainable: int, state_bytes: int) -> float:
    if not gpu.bandwidth:
        return 0.0
    moved = 3 * (params_bytes + 4 * trainable + state_bytes)
    return moved / (gpu.bandwidth * BANDWIDTH_UTILISATION)


# ------------------------------------------------------------------------------ inputs
def _import_callable(spec: str, label: str) -> Callable:
    """'package.module:name' (dotted attributes allowed) -> the callable; one-line errors that
    start with `label` ('model', 'batch function')."""
    mod_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001
        raise _UserError(f"{label} {spec!r}: cannot import {mod_name} ({type(e).__name__}: "
                         f"{e})") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        raise _UserError(f"{label} {spec!r}: {mod_name} has no function or class {attr!r}")
    return obj


def _import_factory(spec: str) -> Callable:
    if ":" not in spec or not all(spec.partition(":")[::2]):
        raise _UserError(f"model {spec!r}: expected a built-in name or 'package.module:factory'")
    return _import_callable(spec, "model")


def _load_batch_fn(spec) -> Callable:
    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise _UserError(f"batch function {spec!r}: expected 'package.module:function'")
    return _import_callable(spec, "batch function")


def _parse_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, str):
        try:
            shape = tuple(int(s) for s in shape.replace("x", ",").split(",") if s.strip())
        except ValueError:
            raise _UserError(f"input shape {shape!r}: expected integers such as 3,224,224") \
                from None
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise _UserError(f"input shape {shape!r}: expected positive integers such as 3,224,224")
    return shape


def _classification_batch(shape, num_classes):
    def make_batch(b):
        return (torch.randn(b, *shape),), torch.randint(0, num_classes, (b,))
    return make_batch


def _infer_num_classes(model: nn.Module, shape) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode
    import copy
    fm = FakeTensorMode(allow_non_fake_inputs=True)
    memo = {id(t): fm.from_tensor(t) for t in list(model.parameters()) + list(model.buffers())}
    m = copy.deepcopy(model, memo)
    try:
        with fm, torch.no_grad():
            out = m(torch.randn(2, *shape))
    except Exception as e:  # noqa: BLE001
        raise _UserError(f"input shape {shape}: the model rejects a batch of this shape "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if hasattr(out, "logits"):
        out = out.logits
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise _UserError("num_classes: cannot infer it from the model's output; pass it")
    return int(out.shape[-1])


def _resolve_workload(model, batch, loss, input_shape, num_classes, model_kwargs):
    """-> (nn.Module, make_batch, loss_fn, description dict)."""
    from .models import MODELS, build_model
    desc: dict[str, Any] = {}
    loss_fn = loss
    make_batch = _load_batch_fn(batch) if batch is not None else None
    if isinstance(model, str) and model in MODELS:
        try:
            wl = build_model(model, **(model_kwargs or {}))
        except (TypeError, ValueError) as e:  # an unknown or bad --model-arg
            raise _UserError(f"model {model}: {e}") from None
        module = wl.model
        make_batch = make_batch or wl.make_batch
        loss_fn = loss_fn or wl.loss_fn
        desc = {"name": model, "builtin": True, "kwargs": dict(model_kwargs or {})}
    else:
        if isinstance(model, str):
            if ":" not in model:
                raise _UserError(f"model {model!r}: not a built-in ({', '.join(MODELS)}) and "
                                 "not 'package.module:factory'")
            factory = _import_factory(model)
            desc = {"name": model.split(":")[-1] + "()", "builtin": False, "spec": model}
        elif isinstance(model, nn.Module):
            factory = None
            module = model
            desc = {"name": type(model).__name__, "builtin": False}
        elif callable(model):
            factory = model
            desc = {"name": getattr(model, "__name__", "factory") + "()", "builtin": False}
        else:
            raise _UserError(f"model: expected a built-in name, 'package.module:factory', a "
                             f"factory or an nn.Module, got {type(model).__name__}")
        if factory is not None:
            try:
                module = factory(**(model_kwargs or {}))
            except Exception as e:  # noqa: BLE001
                raise _UserError(f"model {desc['name']}: the factory raised "
                                 f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
            if not isinstance(module, nn.Module):
                raise _UserError(f"model {desc['name']}: the factory returned "
                                 f"{type(module).__name__}, expected a torch.nn.Module")
        if make_batch is None:
            if input_shape is None:
                raise _UserError(f"model {desc['name']}: give input_shape (--input-shape "
                                 "3,224,224) for a classification batch, or a batch function")
            shape = _parse_shape(input_shape)
            n = num_classes or _infer_num_classes(module, shape)
            make_batch = _classification_batch(shape, n)
    if make_batch is not None:
        make_batch = _checked_batch(make_batch)
    return module, make_batch, loss_fn, desc


def _call_code(make_batch) -> str:
    """How the plan's code calls the model on a batch's inputs x: model(x), model(*x) (DCAL's
    image pair) or model(**x); read from one fake batch."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    from .estimate import _split_batch  # noqa: PLC0415
    try:
        with FakeTensorMode():
            inputs, _ = _split_batch(make_batch(1))
    except Exception:  # noqa: BLE001  (the estimates report a broken batch function)
        return "model(x)"
    if isinstance(inputs, dict):
        return "model(**x)"
    return "model(*x)" if isinstance(inputs, (tuple, list)) else "model(x)"


class _BatchError(Exception):
    pass


def _checked_batch(fn):
    def make_batch(b):
        try:
            return fn(b)
        except Exception as e:  # noqa: BLE001
            raise _BatchError(f"batch function {getattr(fn, '__name__', fn)!r} raised "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    make_batch.__name__ = getattr(fn, "__name__", "make_batch")
    return make_batch


# ------------------------------------------------------------------------------ recommend
def recommend(model="dcal-vit-b16", batch=None, loss=None, optimizer="adamw",
              gpu="v100-16gb", effective_batch: int = 16, precisions=None, policies=None,
              base_lr: float | None = None, base_batch: int | None = None, progress=None, *,
              lr: float | None = None, warmup_steps: int | None = None, input_shape=None,
              num_classes: int | None = None, model_kwargs: dict | None = None,
              confirm: bool = True, blocks=None, overhead: int | None = None,
              margin: float | None = None) -> Plan:
    """Search micro-batch x accumulation x checkpointing x precision for `gpu` (estimated).

    model: built-in name (memprof.models.MODELS), 'package.module:factory', a factory
    () -> nn.Module, or an nn.Module. batch: batch_size -> (inputs, targets) (built-ins bring
    theirs; else input_shape=(3, 224, 224) makes a classification batch). loss: (outputs,
    targets) -> scalar. optimizer: 'adamw' | 'adam' | 'sgd' or params -> Optimizer.
    precisions: default the ones the GPU supports among fp32, fp16, bf16. policies: default
    none, every, every-2, selective (those that apply to the model). progress: called as
    progress(done, total, label) while estimating. See the module docstring for the models of
    memory, fit and throughput."""
    t0 = time.perf_counter()
    try:
        g = _gpus.lookup(gpu)
    except ValueError as e:
        raise _UserError(str(e)) from None
    if isinstance(effective_batch, bool) or not isinstance(effective_batch, int) \
            or effective_batch < 1:
        raise _UserError(f"effective_batch: expected an int >= 1, got {effective_batch!r}")
    usable = _gpus.usable_bytes(g, overhead=overhead, margin=margin)
    if precisions is None:
        precisions = [p for p in PRECISIONS if g.supports(p)]
    else:
        precisions = [precisions] if isinstance(precisions, str) else list(precisions)
        for p in precisions:
            if p not in PRECISIONS:
                raise _UserError(f"precision {p!r}: expected fp32, fp16 or bf16")
            if not g.supports(p):
                raise _UserError(f"precision {p!r}: {g.name} has no {p} hardware support")
    module, make_batch, loss_fn, desc = _resolve_workload(model, batch, loss, input_shape,
                                                          num_classes, model_kwargs)
    if policies is None:
        policies = policies_for(module, DEFAULT_POLICIES) if blocks is None \
            else list(DEFAULT_POLICIES)
    else:
        policies = [policies] if isinstance(policies, str) else list(policies)
        for p in policies:
            parse_policy(p)
    container = None
    if any(parse_policy(p)[0] != "none" for p in policies):
        try:
            name, mods = find_blocks(module) if blocks is None else (str(blocks), [])
            container = (f"model.{name} ({len(mods)} blocks)" if name and mods
                         else f"{blocks}")
        except ValueError:
            container = None
    lr_adv = None
    if base_lr is not None or base_batch is not None:
        lr_adv = lr_advice(base_lr, base_batch, effective_batch, optimizer, lr)
    if warmup_steps is not None and (isinstance(warmup_steps, bool) or int(warmup_steps) < 0):
        raise _UserError(f"warmup_steps: expected an int >= 0, got {warmup_steps!r}")
    estimator = Estimator(module, make_batch, loss_fn, optimizer=optimizer)
    desc["call"] = _call_code(make_batch)

    combos: dict[tuple[str, str], _Combo] = {}
    per_combo = 3 if confirm else 2
    total = len(precisions) * len(policies) * per_combo
    done = 0
    runs = 0

    def tick(label):
        if progress is not None:
            progress(done, total, label)

    def run(b, prec, pol):
        nonlocal runs
        runs += 1
        return estimator.step(b, precision=prec, checkpointing=pol, blocks=blocks)

    for prec in precisions:
        none_fits_all = False
        for pol in policies:
            c = _Combo(prec, pol)
            combos[(prec, pol)] = c
            if none_fits_all and parse_policy(pol)[0] != "none":
                c.skipped = (f"not estimated: without checkpointing the whole effective batch "
                             f"{effective_batch} already fits in {prec}")
                done += per_combo
                tick(f"{prec} {pol}: skipped")
                continue
            t1 = time.perf_counter()
            try:
                tick(f"{prec} {pol}: micro-batch {FIT_BATCHES[0]}")
                lo = run(FIT_BATCHES[0], prec, pol)
                done += 1
                tick(f"{prec} {pol}: micro-batch {FIT_BATCHES[1]}")
                hi = run(FIT_BATCHES[1], prec, pol)
                done += 1
                bm = BatchModel(lo, hi)
                c.model = bm
                c.state_bytes = lo.profile.breakdown("category", at="end").get(
                    "optimizer_state", 0)
                c.max_micro_batch = bm.max_batch(usable, accumulation=2)
                if confirm:
                    target = c.max_micro_batch if c.max_micro_batch < effective_batch \
                        else effective_batch
                    if target >= 1:
                        tick(f"{prec} {pol}: confirming micro-batch {target}")
                        acc = max(1, math.ceil(effective_batch / target))
                        variant = "steady" if acc == 1 else "accumulate"
                        est = {lo.batch_size: lo, hi.batch_size: hi}.get(target) or \
                            run(target, prec, pol)  # estimates are deterministic: reuse
                        pred = bm.predict(target, acc)
                        actual = est.peak(variant, reserved=True)
                        c.confirmed_at = target
                        c.confirm_agreed = abs(actual - pred.peak_reserved) <= \
                            0.005 * max(actual, 1)
                        if not c.confirm_agreed:  # refit on the points nearest the boundary
                            c.model = bm = BatchModel(hi, est) if target != hi.batch_size \
                                else bm
                            c.max_micro_batch = bm.max_batch(usable, accumulation=2)
                    done += 1
                if parse_policy(pol)[0] == "none":
                    p = bm.predict(effective_batch, 1)
                    none_fits_all = p.peak_reserved <= usable
            except _BatchError as e:
                raise _UserError(str(e)) from None
            except _UserError:
                raise
            except Exception as e:  # noqa: BLE001  (one policy failing must not hide the rest)
                c.model = None
                c.error = f"estimate failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                done = len(combos) * per_combo
                if prec == precisions[0] and pol == policies[0] and parse_policy(pol)[0] == \
                        "none":
                    # the plain step fails: the model / loss / batch is the problem
                    raise _UserError(f"model {desc['name']}: a training step failed under fake "
                                     f"tensors: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:200]}") from None
            c.wall_s = time.perf_counter() - t1
    tick("done")
    assumptions = {
        "utilisation": dict(UTILISATION), "bandwidth_utilisation": BANDWIDTH_UTILISATION,
        "launch_s_per_op": LAUNCH_S,
        "overhead_bytes": _gpus.DEFAULT_OVERHEAD_BYTES if overhead is None else int(overhead),
        "margin": _gpus.FIT_MARGIN if margin is None else float(margin),
        "fit_batches": list(FIT_BATCHES),
        "memory": "steady state: optimizer state (and, with accumulation > 1, gradients) "
                  "exist from the start of the step",
        "throughput": "counted FLOPs incl. recompute / (peak x utilisation) + 2 x bytes "
                      "allocated + 3 x parameter bytes / (bandwidth x bandwidth_utilisation)",
    }
    return Plan(gpu=g, effective_batch=effective_batch, combos=combos, usable=usable,
                assumptions=assumptions, model_desc=desc, estimator=estimator, lr=lr_adv,
                warmup=warmup_steps,
                container=container, wall_s=time.perf_counter() - t0, estimates=runs)


# ------------------------------------------------------------------------------ CLI
def _csv(s: str | None) -> list[str] | None:
    if s is None:
        return None
    out = [x.strip() for x in s.split(",") if x.strip()]
    return out or None


def add_cli(subparsers) -> None:
    """Add the `recommend` subcommand to memprof's argparse subparsers."""
    r = subparsers.add_parser(
        "recommend", help="what fits on a GPU: micro-batch x accumulation x checkpointing x "
                          "precision, with LR/warmup advice (estimates)")
    r.add_argument("--gpu", required=True, help="GPU name (see `memprof gpus`), e.g. v100-16gb")
    r.add_argument("--model", required=True,
                   help="built-in model name or package.module:factory (factory() -> nn.Module)")
    r.add_argument("--model-arg", action="append", metavar="KEY=VALUE", default=[],
                   help="keyword for the model's constructor or factory, repeatable (e.g. "
                        "attention_backend=fused: DCAL with memprof's fused attention)")
    r.add_argument("--effective-batch", type=int, required=True,
                   help="samples per optimizer step (micro-batch x accumulation)")
    r.add_argument("--precision", action="append", metavar="P",
                   help="fp32, fp16, bf16 (repeat or comma-separate; default: all the GPU has)")
    r.add_argument("--checkpointing", metavar="POLICIES",
                   help="comma-separated policies (default none,every,every-2,selective)")
    r.add_argument("--blocks", help="qualified name of the repeated blocks to checkpoint")
    r.add_argument("--optimizer", default="adamw", help="adamw (default), adam or sgd")
    r.add_argument("--input-shape", help="per-sample input shape for a classification batch, "
                                         "e.g. 3,224,224 (models given as module:factory)")
    r.add_argument("--num-classes", type=int, help="classes for --input-shape (default: "
                                                   "inferred from the model's output)")
    r.add_argument("--batch-fn", help="package.module:function, function(batch_size) -> "
                                      "(inputs, targets)")
    r.add_argument("--base-lr", type=float, help="LR of the recipe at --base-batch")
    r.add_argument("--base-batch", type=int, help="batch size --base-lr was tuned for")
    r.add_argument("--lr", type=float, help="the LR you use: warn if far from the scaled one")
    r.add_argument("--warmup-steps", type=int,
                   help="warmup in micro-steps (batches): converted to optimizer steps")
    r.add_argument("--no-confirm", action="store_true",
                   help="skip the confirming estimate at each boundary (faster)")
    r.add_argument("--all", action="store_true", help="show every option, not a summary")
    r.add_argument("--json", action="store_true", help="print the plan as JSON")
    r.set_defaults(func=_cmd_recommend)


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """['depth=6', 'attention_backend=fused'] -> {'depth': 6, 'attention_backend': 'fused'}:
    values are Python literals where they parse as one, strings otherwise."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise _UserError(f"--model-arg {item!r}: expected KEY=VALUE with KEY a Python "
                             "identifier (e.g. attention_backend=fused)")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        out[key.strip()] = value
    return out


def _cmd_recommend(args) -> int:
    from rich.console import Console
    precisions = None
    if args.precision:
        precisions = [p for s in args.precision for p in _csv(s)]
    if (args.base_lr is None) != (args.base_batch is None):
        raise _UserError("--base-lr and --base-batch go together")
    if args.model and ":" in args.model and args.input_shape is None and args.batch_fn is None:
        raise _UserError(f"--model {args.model}: give --input-shape (e.g. 3,224,224) or "
                         "--batch-fn")
    err = Console(stderr=True)
    kw = dict(model=args.model, model_kwargs=parse_model_args(args.model_arg), batch=args.batch_fn, optimizer=args.optimizer, gpu=args.gpu,
              effective_batch=args.effective_batch, precisions=precisions,
              policies=_csv(args.checkpointing), base_lr=args.base_lr,
              base_batch=args.base_batch, lr=args.lr, warmup_steps=args.warmup_steps,
              input_shape=args.input_shape, num_classes=args.num_classes,
              confirm=not args.no_confirm, blocks=args.blocks)
    plan = _with_progress(err, **kw)
    if args.json:
        print(plan.to_json())
    else:
        plan.print(Console(), all_options=args.all)
    return 0


def _with_progress(console, **kw) -> Plan:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn)
    if not console.is_terminal:
        return recommend(**kw)
    with Progress(SpinnerColumn(), TextColumn("estimating {task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("", total=None)

        def progress(done, total, label):
            bar.update(task, completed=done, total=total, description=label)
        return recommend(progress=progress, **kw)


def recommend_cli_demo(console=None) -> Plan:
    """What `memprof demo` shows: dcal-vit-b16 on a 16 GB V100, effective batch 16."""
    from rich.console import Console
    console = console or Console()
    console.print("memprof recommend --gpu v100-16gb --model dcal-vit-b16 --effective-batch 16"
                  " --base-lr 5e-4 --base-batch 512\n")
    t0 = time.perf_counter()
    plan = _with_progress(console, model="dcal-vit-b16", gpu="v100-16gb", effective_batch=16,
                          base_lr=5e-4, base_batch=512)
    plan.print(console)
    ok8 = [o for o in plan.options if o.micro_batch == 8 and o.checkpointing == "none"]
    ck = [o for o in plan.options if o.fits and o.checkpointing != "none"]
    verdict = ("was not estimated" if not ok8 else
               "fits" if any(o.fits for o in ok8) else "does not fit")
    sizes = ", ".join(f"{o.precision} {o.peak_reserved / GiB:.1f} GiB" for o in ok8)
    console.print(
        f"[dim]Seeds 000/001 on a 16 GB V100: micro-batch 8 without checkpointing "
        f"{verdict} here" + (f" ({sizes} reserved)" if ok8 else "")
        + f", and {'a' if ck else 'no'} checkpointed configuration reaches effective batch 16 "
          f"({time.perf_counter() - t0:.1f} s).[/]")
    return plan
