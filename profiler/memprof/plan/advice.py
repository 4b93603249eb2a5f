"""Learning-rate and warmup advice for a changed effective batch.

The learning rate is scaled for the effective batch from base_lr / base_batch (linear rule; the
square-root rule is given for Adam-style optimizers); warmup given in micro-steps is converted
to optimizer steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import PlanInputError
from .optimizers import optimizer_kind

__all__ = ["LRAdvice", "lr_advice", "warmup_advice"]


#: how far (either way) an lr may be from the scaled one before it is warned about: seeds/002's
#: run diverged to NaN at 4x the linearly scaled lr (3.2 for 0.8), which a 4x threshold let
#: pass as "within 4x"; from 2x on an lr is called out
FAR = 2.0 * (1 - 1e-9)


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
            if max(r, 1 / r) < FAR:
                out.append(f"  your lr {self.lr:g} = {r:.2g} x the linearly scaled value "
                           f"(within {FAR:g}x)")
            else:
                out.append(f"  your lr {self.lr:g} = {r:.2g} x the linearly scaled value, "
                           f"{self.lr / self.sqrt_lr:.2g} x the square-root-scaled one (within "
                           f"{FAR:g}x of the Adam-style rule)")
        return out


def lr_advice(base_lr: float, base_batch: int, effective_batch: int, optimizer="adamw",
              lr: float | None = None) -> LRAdvice:
    """Scale base_lr (tuned at base_batch) to effective_batch; warn when lr is FAR x off."""
    if base_lr is None or base_batch is None:
        raise PlanInputError("base_lr and base_batch go together (the LR a recipe used at its "
                             "batch)")
    if not base_lr > 0 or int(base_batch) < 1:
        raise PlanInputError(f"base_lr / base_batch: expected positive numbers, got {base_lr}, "
                             f"{base_batch}")
    k = effective_batch / base_batch
    kind = optimizer_kind(optimizer)
    linear, sqrt_ = base_lr * k, base_lr * math.sqrt(k)
    adv = LRAdvice(base_lr=float(base_lr), base_batch=int(base_batch),
                   effective_batch=int(effective_batch), optimizer_kind=kind, linear_lr=linear,
                   sqrt_lr=sqrt_, recommended_lr=linear, rule="linear", lr=lr)
    if lr is not None:
        if not lr > 0:
            raise PlanInputError(f"lr: expected a positive learning rate, got {lr}")
        adv.ratio = lr / linear
        far_linear = max(adv.ratio, 1 / adv.ratio) >= FAR
        far_sqrt = max(lr / sqrt_, sqrt_ / lr) >= FAR
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
