"""An LR range test (fastai's lr_find, Lightning's Tuner.lr_find, torch-lr-finder, a sweep by
hand) told apart from a warmup: both raise the LR, but a range test raises it for the whole
run and ends, by design, where the loss diverges. Read as a warmup, the health table said
"warmup 79+ optimizer steps" and that divergence was an error whose fix was "lengthen the
warmup".

The rule: the LR is multiplied by one factor (within RATIO_TOLERANCE) at every one of at least
MIN_STEPS optimizer steps (the first may rise by another: Lightning's starts from min_lr), and
ends at least MIN_SPAN times where it began. A range test sweeps
decades geometrically (the exponential mode is the default of all three tools); a warmup ramps
linearly to its peak and then holds or decays. A linear sweep (Lightning's mode="linear") and
a run profiled before its warmup ended look alike, so a linear rise stays an unfinished warmup
("warmup N+"): only the geometric sweep is claimed.
"""
from __future__ import annotations

import math

import numpy as np

MIN_STEPS = 8
MIN_SPAN = 100.0
RATIO_TOLERANCE = 0.02
#: the loss past its lowest value by this factor is where the sweep diverged (the stop rule
#: of Lightning's lr_find, early_stop_threshold=4.0, and of fastai's)
DIVERGE_FACTOR = 4.0
#: the findings a range test's end makes: past the lowest loss, they are its expected end
DIVERGENCE_KINDS = ("nonfinite_loss", "nonfinite_gradients", "loss_spikes")


def range_test(lrs, steps=None) -> dict | None:
    """{"first", "last", "factor_per_step", "steps"} where the LRs (one per optimizer step)
    are a range test by the module's rule, else None. `steps`: the step of each LR, where
    some steps have none (a GradScaler's skipped steps: the scheduler stepped, the optimizer
    did not), so that the factor is read across the gap, in the usual gap's units; else one
    LR a step."""
    a = np.asarray(lrs, dtype=np.float64)
    if a.size < MIN_STEPS or not np.isfinite(a).all() or (a <= 0).any():
        return None
    gaps = np.diff(np.asarray(steps, dtype=np.float64)) if steps is not None else 1.0
    if steps is not None:
        if len(steps) != a.size or (gaps <= 0).any():
            return None
        gaps = gaps / np.median(gaps)   # (steps counted per micro-batch: one LR every k)
    ratios = (a[1:] / a[:-1]) ** (1.0 / gaps)
    g = float(np.median(ratios))
    # the first step may rise by another factor (Lightning's lr_find starts at min_lr, then
    # its scheduler's first value): it must rise, and every later step by the one factor
    if g <= 1.0 or ratios[0] <= 1.0 or float(np.abs(ratios[1:] / g - 1.0).max()) > \
            RATIO_TOLERANCE:
        return None
    if a[-1] < MIN_SPAN * a[0]:
        return None
    return {"first": float(a[0]), "last": float(a[-1]), "factor_per_step": g,
            "steps": int(a.size)}


def sweep_reading(lr_by_step: dict[int, float], loss_by_step: dict[int, float]) -> dict:
    """What the sweep found: the step and LR of the lowest finite loss, and of the first step
    after it whose loss is non-finite or DIVERGE_FACTOR times that lowest (None where the loss
    never diverged)."""
    steps = [s for s in sorted(loss_by_step) if s in lr_by_step]
    finite = [s for s in steps if math.isfinite(loss_by_step[s])]
    if not finite:
        return {"lowest_loss": None, "diverged": None}
    low = min(finite, key=lambda s: loss_by_step[s])
    lowest = {"step": low, "lr": lr_by_step[low], "loss": loss_by_step[low]}
    bar = loss_by_step[low] + (DIVERGE_FACTOR - 1.0) * abs(loss_by_step[low])
    diverged = next(({"step": s, "lr": lr_by_step[s], "loss": loss_by_step[s]}
                     for s in steps if s > low and not (loss_by_step[s] <= bar)), None)
    return {"lowest_loss": lowest, "diverged": diverged}


def first_step(finding) -> int | None:
    """The first optimizer step a divergence finding is about."""
    ev = finding.evidence
    if "first_step" in ev:
        return int(ev["first_step"])
    spikes = ev.get("spike_steps") or []
    return int(min(spikes)) if spikes else None


def reread(findings: list, rt: dict) -> None:
    """Say the divergence findings in a range test's terms: one at or past the lowest loss is
    its expected end (info); one before it is still what it was, without warmup advice."""
    low = (rt.get("lowest_loss") or {}).get("step")
    sweep = (f"an LR range test (the LR x{rt['factor_per_step']:.4g} a step, "
             f"{rt['first']:.3g} -> {rt['last']:.3g})")
    for f in findings:
        if f.kind not in DIVERGENCE_KINDS:
            continue
        s = first_step(f)
        if low is not None and s is not None and s >= low:
            f.severity = "info"
            f.message += f"; past the lowest loss (step {low}): the end of {sweep}"
            f.fix = ("expected at the high end of a range test: train below the LR where the "
                     "loss diverged (a common pick: the lowest loss's LR / 10)")
        else:
            f.message += f"; during {sweep}, before the loss reached its lowest"
            f.fix = ("at a low LR, so not the sweep's end: check the data of that step and "
                     "any log/div/sqrt in the loss; under fp16 use a GradScaler or bf16")
