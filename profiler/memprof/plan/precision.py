"""What a precision means for one model on one GPU: the single place the planner asks.

A plan's precision is the dtype its step computes in. What that takes depends on the
model's own weights (`model_precision`):

* fp32 weights: fp32, or AMP - `torch.autocast` in fp16 / bf16 over the fp32 weights (fp32
  master weights), with `GradScaler` for fp16.
* half-precision weights (`model.half()`, `torch_dtype=torch.bfloat16`): the model trains in
  that dtype as built. When every trained parameter is of that dtype, there is nothing for
  autocast to do and nothing GradScaler can unscale (it raises "Attempting to unscale FP16
  gradients"): no autocast, no GradScaler, and the plan says what that costs. Trained fp32
  parameters beside half frozen weights (LoRA adapters) run under autocast, with GradScaler
  for fp16. fp32 is not offered: it is another model (`model.float()`), built by the user.
* half weights the GPU cannot run (bf16 on a V100 or T4): converted to the other half
  precision first (bf16 -> fp16: the same bytes), and the code does the conversion.

The same rules choose the estimate's autocast (`memprof.plan.estimate`), the printed code
(`memprof.plan.codegen`), the precisions a plan offers (`memprof.plan.search`) and the advice
of a budget replay (`memprof.plan.budget`, `memprof.plan.fit`). Model-specific caveats live
here too (`fp16_overflow`: T5).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..units import fmt_bytes
from .cuda_autocast import LOW_PRECISION_DTYPES
from .gpus import PRECISIONS

__all__ = ["ESTIMATE_PRECISIONS", "ModelPrecision", "Training", "model_precision",
           "precision_of_dtype", "training", "default_precisions", "refusal", "notes",
           "fp16_overflow", "unsupported", "run_precision", "not_planned"]

#: the precisions an estimate models: fp32 and the AMP precisions whose CUDA autocast policy
#: is emulated (tf32 keeps fp32 storage and only speeds up matmuls: its memory is fp32's)
ESTIMATE_PRECISIONS = tuple(p for p in PRECISIONS if p == "fp32" or p in LOW_PRECISION_DTYPES)

_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_DTYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16"}
# Hugging Face model types of the T5 family (T5-style relative attention, no scaling of the
# feed-forward residual): their activations outgrow fp16's range
_T5_FAMILY = ("t5", "mt5", "umt5", "longt5", "switch_transformers")
FP16_OVERFLOW_T5 = ("T5's activations overflow fp16 (inf / NaN losses in fp16; it was "
                    "pre-trained in bf16): prefer bf16 on a GPU that has it, else fp32, or "
                    "check that the loss stays finite")


def precision_of_dtype(dtype) -> str:
    """'fp16' / 'bf16' for a half-precision dtype (a torch.dtype or its name), else 'fp32'."""
    if isinstance(dtype, str):
        return _DTYPE_NAMES.get(dtype.rpartition(".")[2], "fp32")
    return _NAMES.get(dtype, "fp32")


@dataclass(frozen=True)
class ModelPrecision:
    """The precisions a model's parameters are in (floating ones, each storage once)."""
    weights: str = "fp32"                 # the precision holding most parameter bytes
    trainable: frozenset = frozenset()    # precisions of the trained parameters
    weight_bytes: dict = field(default_factory=dict)   # bytes per precision
    fp16_overflow: str | None = None      # why fp16 overflows this model (T5), else None

    @property
    def half(self) -> bool:
        return self.weights in LOW_PRECISION_DTYPES

    def describe(self) -> str:
        """'bf16 (12.55 GiB of 12.80 GiB of parameters)' or 'fp16' when all are."""
        total = sum(self.weight_bytes.values())
        mine = self.weight_bytes.get(self.weights, 0)
        return self.weights if mine >= total else \
            f"{self.weights} ({fmt_bytes(mine)} of {fmt_bytes(total)} of parameters)"


def model_precision(module: torch.nn.Module) -> ModelPrecision:
    """The precisions of `module`'s floating parameters (a meta-built model too)."""
    by: dict[str, int] = {}
    trainable = set()
    seen = set()
    for p in module.parameters():
        if id(p) in seen or not p.is_floating_point():
            continue
        seen.add(id(p))
        prec = precision_of_dtype(p.dtype)
        by[prec] = by.get(prec, 0) + p.numel() * p.element_size()
        if p.requires_grad:
            trainable.add(prec)
    weights = max(by, key=by.get) if by else "fp32"
    return ModelPrecision(weights, frozenset(trainable), by, fp16_overflow(module))


def fp16_overflow(module: torch.nn.Module) -> str | None:
    """Why this model overflows in fp16 (the T5 family, by its Hugging Face config or its
    classes), else None."""
    for m in module.modules():
        config = m.__dict__.get("config")
        if getattr(config, "model_type", None) in _T5_FAMILY:
            return FP16_OVERFLOW_T5
        if type(m).__name__.startswith(("T5", "MT5", "UMT5", "LongT5")):
            return FP16_OVERFLOW_T5
    return None


@dataclass(frozen=True)
class Training:
    """How a step in `precision` runs for a model (see the module docstring)."""
    precision: str
    convert: tuple | None    # (from, to): the model's half weights converted before training
    autocast: bool
    grad_scaler: bool

    @property
    def convert_dtypes(self) -> tuple | None:
        """(torch dtype from, torch dtype to) of the conversion, or None."""
        if self.convert is None:
            return None
        return LOW_PRECISION_DTYPES[self.convert[0]], LOW_PRECISION_DTYPES[self.convert[1]]


def training(mp: ModelPrecision, precision: str) -> Training:
    """The rule of the module docstring for `precision` on a model of precisions `mp`."""
    if precision not in LOW_PRECISION_DTYPES:     # fp32: the model as built
        return Training(precision, None, False, False)
    convert = (mp.weights, precision) if mp.half and mp.weights != precision else None
    trained = {precision if convert and p == convert[0] else p for p in mp.trainable}
    as_built = mp.half and trained == {precision}   # nothing left for autocast to cast
    return Training(precision, convert, autocast=not as_built,
                    grad_scaler=precision == "fp16" and "fp16" not in trained)


def unsupported(gpu, precision: str) -> str:
    return f"{gpu.name} has no {precision} hardware support"


def refused(gpu, precision: str, name: str = "precision") -> str:
    """The one line for a precision asked of a GPU without it, with what to ask instead (the
    precisions the GPU table gives it). `name`: what the precision was given as (recommend's
    'precisions', '--precision')."""
    has = [p for p in ESTIMATE_PRECISIONS if gpu.supports(p)]
    return f"{name} {precision!r}: {unsupported(gpu, precision)}; it supports " \
           f"{' or '.join(has)}"


def not_planned(gpu, precision, name: str = "precision") -> str | None:
    """Why `precision` cannot be planned on `gpu` whatever the model (unknown, or the GPU
    lacks it): one line starting with `name`, else None. Checked before a model is built."""
    if precision not in ESTIMATE_PRECISIONS:
        return f"{name} {precision!r}: expected {', '.join(ESTIMATE_PRECISIONS[:-1])} or " \
               f"{ESTIMATE_PRECISIONS[-1]}"
    return None if gpu.supports(precision) else refused(gpu, precision, name)


def default_precisions(mp: ModelPrecision, gpu) -> list[str]:
    """The precisions a plan estimates when none are given."""
    if not mp.half:
        return [p for p in ESTIMATE_PRECISIONS if gpu.supports(p)]
    if gpu.supports(mp.weights):
        return [mp.weights]
    return [p for p in LOW_PRECISION_DTYPES if gpu.supports(p)]   # converted (same bytes)


def refusal(mp: ModelPrecision, gpu, precision: str, name: str = "precision") -> str | None:
    """Why `precision` cannot be planned for this model on `gpu` (one line starting with
    `name`), else None."""
    if not gpu.supports(precision):
        return refused(gpu, precision, name)
    trains_half = bool(mp.trainable) and mp.trainable <= set(LOW_PRECISION_DTYPES)
    if mp.half and precision not in LOW_PRECISION_DTYPES and not gpu.supports(mp.weights):
        # fp32 as built leaves the frozen half base computing in a dtype this GPU lacks
        return (f"{name} {precision!r}: the model's weights are {mp.describe()}, which "
                f"{gpu.name} does not compute in; plan fp16 (the weights converted) instead")
    if mp.half and trains_half and precision not in LOW_PRECISION_DTYPES:
        # (fp32 adapters over a frozen half base, LoRA's shape, train in fp32 as built)
        return (f"{name} {precision!r}: the model's weights are {mp.describe()}: it trains "
                f"in {mp.weights} as built; build it in fp32 (without .half() / "
                "torch_dtype) for fp32, or for mixed precision over fp32 master weights")
    return None


def notes(mp: ModelPrecision, precision: str, gpu) -> list[str]:
    """What a user must know about training this model in `precision` on `gpu`."""
    how = training(mp, precision)
    out = []
    if how.convert is not None:
        src, dst = how.convert
        why = f"{unsupported(gpu, src)}: " if not gpu.supports(src) else ""
        out.append(f"the model's weights are {mp.describe()}; {why}estimated converted to "
                   f"{dst} (the same bytes), as the plan's code converts them")
    if precision in LOW_PRECISION_DTYPES and not how.autocast:
        out.append(f"the trained parameters are {precision} themselves: it trains in {precision} "
                   "as built, with no autocast" + (
                       ", no GradScaler (it cannot unscale fp16 gradients) and no fp32 master "
                       "weights: small gradients underflow and updates below fp16's "
                       "resolution are lost; for mixed precision build the model in fp32 and "
                       "plan again (autocast + GradScaler)" if precision == "fp16" else
                       " and no fp32 master weights: updates below bf16's resolution are lost"))
    elif precision == "fp16" and not how.grad_scaler:
        out.append("some trained parameters are fp16: no GradScaler (it cannot unscale fp16 "
                   "gradients), so the loss is not scaled and small gradients can underflow")
    if precision == "fp16" and mp.fp16_overflow:
        out.append(mp.fp16_overflow)
    return out


def run_precision(inputs: dict | None) -> tuple[str, str]:
    """(precision, what says so) of a recorded step (`memprof.record.inputs`): its parameters'
    when most of their bytes are half precision ('weights'), else its autocast dtype
    ('autocast'; 'fp32' and 'weights' without one)."""
    inputs = inputs or {}
    weights = {precision_of_dtype(k): 0 for k in inputs.get("weights", {})}
    for k, v in inputs.get("weights", {}).items():
        weights[precision_of_dtype(k)] += int(v)
    heaviest = max(weights, key=weights.get) if weights else "fp32"
    if heaviest in LOW_PRECISION_DTYPES:
        return heaviest, "weights"
    dtype = next(iter(inputs.get("autocast", {}).values()), None)
    if dtype is not None:
        return precision_of_dtype(dtype), "autocast"
    return "fp32", "weights"
