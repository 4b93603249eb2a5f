"""Training health from what record.health recorded: loss per step, spikes, non-finite values,
gradient clipping, learning rate and scheduler order (the rules are in record/health.py's
docstring and in the constants below, and each finding states its rule)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..finding import Finding
from ..profile import Profile
from .lr_range import range_test, reread, sweep_reading
from .schedule import fmt as _fmt
from .schedule import scheduler_findings, warmup_length

LOSS_WINDOW = 8
LOSS_MIN_HISTORY = 3
LOSS_REL_JUMP = 0.30
LOSS_Z = 3.5
#: a jump smaller than this is float noise, whatever its relative size (a loss of 1e-9 that
#: "jumped" to 1.2e-8 was reported as +767 %)
LOSS_MIN_JUMP = 1e-6
#: ... and by more than this multiple of the run's own tail of jumps above the median until
#: then (the LOSS_TAIL_QUANTILE quantile of the earlier jumps, over at least the first
#: LOSS_TAIL_STEPS; a lower quantile where there are few, so that LOSS_TAIL_EXCLUDED jumps -
#: the spikes themselves - stay above it; earlier only: a run that blows up later does not
#: raise the bar for what came before). Minibatch losses are skewed to the right (a hard batch
#: costs several times the median one): healthy runs at small batches went above 3.5 robust SD
#: once or twice in 300 steps; their largest jump was at most 2.5x their 99th percentile (24
#: runs of 600 steps, batch 1-64, seeds 0-5 of the run in tests/analyse/test_health.py).
LOSS_TAIL_MULTIPLE = 3.0
LOSS_TAIL_QUANTILE = 0.99
LOSS_TAIL_STEPS = 100
LOSS_TAIL_EXCLUDED = 3
#: ... or past the median jump by this multiple of the most that the largest jump of the run's
#: noise would pass it by, as an exponential tail through its median and 90th-percentile jumps
#: predicts it over the run's steps (spikes of up to ~10 % of the steps do not move those: a
#: bad batch every 10-25 steps set the 99th percentile itself and hid behind it). Healthy
#: runs: at most 1.65x (the same 24 runs).
LOSS_NOISE_MULTIPLE = 2.0
CLIP_ALWAYS_FRACTION = 0.9
CLIP_MIN_STEPS = 5
CLIP_MISMATCH = 0.05


def loss_spikes(losses, window: int = LOSS_WINDOW, min_history: int = LOSS_MIN_HISTORY,
                rel_jump: float = LOSS_REL_JUMP, z: float = LOSS_Z,
                tail_multiple: float = LOSS_TAIL_MULTIPLE) -> list[dict]:
    """Indices where the loss jumps above its causal rolling median (rule in
    record/health.py's docstring)."""
    y = np.asarray(losses, dtype=np.float64)
    med = rolling_median(y, window, min_history)
    ok = np.isfinite(med) & np.isfinite(y)
    if not ok.any():
        return []
    resid = y[ok] - med[ok]
    sigma = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
    sigma = max(sigma, 0.01 * float(np.median(np.abs(med[ok]))), 1e-12)
    q50, q90 = np.quantile(resid, [0.5, 0.9])
    # the largest jump n steps of exponential-tailed noise give: q50 + scale x ln(2n)
    noise_bar = q50 + LOSS_NOISE_MULTIPLE * (q90 - q50) / math.log(5) * math.log(2 * resid.size)
    out = []
    for i, k in enumerate(np.flatnonzero(ok)):
        r = y[k] - med[k]
        base = abs(med[k])
        if not (base > 0 and r > rel_jump * base and r > z * sigma and r > LOSS_MIN_JUMP):
            continue
        tail = jump_tail(resid[:max(i, LOSS_TAIL_STEPS)])
        if r > tail_multiple * tail or r > noise_bar:
            out.append({"index": int(k), "loss": float(y[k]), "rolling_median": float(med[k]),
                        "relative_jump": float(r / base), "z": float(r / sigma),
                        "tail_multiple": float(r / tail) if tail > 0 else None})
    return out


def jump_tail(resid: np.ndarray) -> float:
    """A large jump of the run's own noise: the LOSS_TAIL_QUANTILE quantile of `resid` (the
    jumps above the rolling median so far), or a lower one where that would reach into the
    LOSS_TAIL_EXCLUDED largest (few steps: the spikes must not set the bar they are held
    to); never below zero (a loss that only falls)."""
    if resid.size == 0:
        return 0.0
    q = min(LOSS_TAIL_QUANTILE, 1.0 - LOSS_TAIL_EXCLUDED / resid.size)
    return max(float(np.quantile(resid, max(q, 0.5))), 0.0)


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


def health_analysis(profile: Profile) -> list[Finding]:
    """Default analysis: the health findings (none without health=True and prof.log())."""
    result = _analyse(profile)
    return result[1] if result is not None else []


def summarize(profile: Profile) -> dict[str, Any] | None:
    """Training health of a profile as plain data (what `prof.health` returns), or None when
    the block ran without health=True and without prof.log()."""
    result = _analyse(profile)
    return result[0] if result is not None else None


def _advice(kind: str, severity: str, *, message: str, fix: str, evidence: dict,
            holder: str | None = None) -> Finding:
    """A health finding: advice about training, with no bytes of its own."""
    return Finding(kind=kind, severity=severity, bytes=0, message=message, fix=fix,
                   holder=holder, evidence=evidence)


class _Records:
    """record.health's plain data, indexed the way the rules read it."""

    def __init__(self, data: dict):
        self.grad = {int(s): {"norm": n, "bad": b, "lr": lr} for s, n, b, lr in data["grad"]}
        self.clips = data["clips"]
        self.value_clips = data.get("value_clips") or []
        self.losses = data["losses"]
        self.loss_divisors = data.get("loss_divisors") or [None] * len(self.losses)
        self.loss_unscaled = data.get("loss_unscaled") or [False] * len(self.losses)
        self.timeline = data["timeline"]
        self.errors = data["errors"]


def _analyse(profile: Profile) -> tuple[dict, list[Finding]] | None:
    data = profile.run.records.get("health")
    rec = _Records(data) if data is not None else None
    logs = profile.run.records.get("logs") or []
    if rec is None and not logs:
        return None
    items = ((profile.run.records.get("inputs") or {}).get("kwargs") or {}).get(
        "num_items_in_batch") or {}
    summary, per_loss = _per_step(rec, logs, "tensor" in items or
                                  bool((items.get("value") or 0) > 0))
    # steps whose update a GradScaler skipped (inf/NaN gradients: expected while its scale
    # settles, and what it is for): said, not a finding
    first = int(profile.run.records.get("first_step") or 0)   # a nested block's first
    summary["skipped_by_grad_scaler"] = [
        s - first for s in profile.run.records.get("skipped_steps") or [] if s >= first]
    findings = _nonfinite(rec, summary, per_loss)
    findings += _spikes(summary, per_loss)
    if rec is None:
        return summary, findings
    findings += _clipping(rec, summary)
    if rec.value_clips:   # clip_grad_value_: each gradient entry clamped; what it cut is not read
        values = sorted({v for _, v in rec.value_clips})
        summary["value_clipping"] = {"clip_values": values,
                                     "steps": len({s for s, _ in rec.value_clips})}
    grad = rec.grad
    lr_steps = [s for s in sorted(grad) if grad[s]["lr"]]
    lr0 = [grad[s]["lr"][0] for s in lr_steps]
    # an LR range test rises for the whole run: no warmup (read across the steps a
    # GradScaler skipped, which left no LR)
    sweep = range_test(lr0, lr_steps)
    warm, complete = warmup_length(lr0) if sweep is None else (None, False)
    if sweep is not None:
        sweep.update(sweep_reading(dict(zip(lr_steps, lr0)), per_loss))
        reread(findings, sweep)
    summary["lr"] = {"first": lr0[0] if lr0 else None,
                     "peak": max(lr0) if lr0 else None,
                     "last": lr0[-1] if lr0 else None,
                     "warmup_optimizer_steps": warm, "warmup_complete": complete,
                     "range_test": sweep,
                     "param_groups": len(grad[lr_steps[0]]["lr"]) if lr_steps else 0}
    findings += scheduler_findings(rec, summary, warm, complete)
    return summary, findings


def _clips_by_step(rec) -> tuple[dict[int, dict], dict[int, int]]:
    """The last clip call of each step, and how many calls each step made."""
    clip_by_step: dict[int, dict] = {}
    calls_by_step: dict[int, int] = {}
    for c in (rec.clips if rec is not None else []):
        clip_by_step[c["step"]] = c
        calls_by_step[c["step"]] = calls_by_step.get(c["step"], 0) + 1
    return clip_by_step, calls_by_step


def _per_step(rec, logs, window_normalised: bool = False) -> tuple[dict, dict[int, float]]:
    """The summary's per-step table, and the loss of each optimizer step. window_normalised:
    the model was called with `num_items_in_batch` (Hugging Face's Trainer with gradient
    accumulation): each micro-step's loss is its sum over the items of the whole optimizer
    step, so the step's loss is the sum of its micro-steps' (their mean read 1.51 where the
    Trainer logged 6.05 over 4 micro-steps)."""
    logged: dict[str, dict[int, list[float]]] = {}
    for step, name, v in logs:
        logged.setdefault(name, {}).setdefault(step, []).append(v)
    if "loss" in logged:
        per_loss = {s: float(np.mean(v)) for s, v in logged["loss"].items()}
        loss_source = "logged: prof.log(loss=...) or a memprof framework callback"
    else:
        by: dict[int, list[float]] = {}
        divisors: dict[int, list] = {}
        for (step, v), d in zip(rec.losses, rec.loss_divisors) if rec is not None else ():
            if v is not None:
                by.setdefault(step, []).append(v)
                divisors.setdefault(step, []).append(d)
        k = _accumulation_divisor(by, divisors)
        summed = not k and window_normalised
        per_loss = {s: float(np.sum(v)) if summed else float(np.mean(v)) * (k[s] if k else 1.0)
                    for s, v in by.items()}
        loss_source = "root of backward" if per_loss else None
        if per_loss and rec.loss_unscaled and all(rec.loss_unscaled):
            loss_source += " before GradScaler's scale"
        if k:
            ks = sorted(set(k.values()))
            each = " and ".join(f"{x:g}" for x in ks)
            loss_source += (f" times {each}: the loss was divided by the {each} micro-steps of "
                            + ("each optimizer step" if len(ks) == 1 else
                               "its optimizer step (the accumulation changed)"))
        elif summed and per_loss:
            loss_source += (", summed over each optimizer step's micro-steps: the model was "
                            "given num_items_in_batch, the items of the whole step, and "
                            "divided each micro-step's loss by them")
    grad = rec.grad if rec is not None else {}
    steps = sorted(set(per_loss) | set(grad))
    clip_by_step, _ = _clips_by_step(rec)
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
    return summary, per_loss


def _accumulation_divisor(by_step: dict[int, list[float]],
                          divisors: dict[int, list]) -> dict[int, float] | None:
    """{step: k} when every backward root was the loss divided by k (record.health._divisor)
    and k is the number of micro-steps of the optimizer steps divided by it (their median: an
    epoch's last step may be short): gradient accumulation's scaling, which the loss shown
    undoes (a loss of 1.56 read as the model's was 6.25 / 4), also where the accumulation
    changed mid-run (4, then 8: the loss read as halved). Any other scaling is the user's loss
    and is shown as it is."""
    if not divisors:
        return None
    out: dict[int, float] = {}
    counts: dict[float, list[int]] = {}
    for s, ds in divisors.items():
        if any(d is None for d in ds) or len(set(ds)) != 1:
            return None
        out[s] = k = float(ds[0])
        counts.setdefault(k, []).append(len(by_step[s]))
    for k, n in counts.items():
        if abs(float(np.median(n)) - k) > 1e-6 * k:
            return None
    return out


def _nonfinite(rec, summary: dict, per_loss: dict[int, float]) -> list[Finding]:
    findings: list[Finding] = []
    grad = rec.grad if rec is not None else {}
    clips = rec.clips if rec is not None else []
    loss_source = summary["loss_source"]
    loss_steps = sorted(per_loss)
    bad_loss = [s for s in loss_steps if not math.isfinite(per_loss[s])]
    if bad_loss:
        findings.append(_advice("nonfinite_loss", "error",
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
        first = dict(grad[bad_grad[0]])
        # a clip with a NaN total leaves every gradient NaN, so the optimizer's pre-hook can
        # only name the first parameter; the step's first clip read them before it scaled them
        before_clip = [c["bad"] for c in clips if c.get("bad") and c["step"] == bad_grad[0]]
        if before_clip:
            first["bad"] = before_clip[0]
        findings.append(_advice("nonfinite_gradients", "error",
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
                            "first_parameter": first["bad"] if bad_grad else None}
    return findings


def jump_text(relative: float) -> str:
    """A loss jump over its rolling median as a user reads it: a percentage up to 10x, a
    factor past it (a diverging loss, 1e30 times its median, read as a 33-digit percentage)."""
    if relative < 9:
        return f"+{100 * relative:.0f}%"
    factor = 1 + relative   # (whole up to 10,000x: 150x read "1.5e+02x")
    return f"{factor:.0f}x the rolling median" if factor < 1e4 else \
        f"{factor:.2g}x the rolling median"


def _spikes(summary: dict, per_loss: dict[int, float]) -> list[Finding]:
    findings: list[Finding] = []
    losses = [per_loss[s] for s in sorted(per_loss)]
    loss_steps = sorted(per_loss)
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
        findings.append(_advice("loss_spikes", "warning",
            message=(f"the loss jumped above its trend at {len(spikes)} of {len(losses)} "
                     f"optimizer steps (worst: step {worst['step']}, {_fmt(worst['loss'])} vs "
                     f"rolling median {_fmt(worst['rolling_median'])}, "
                     f"{jump_text(worst['relative_jump'])}); rule: > {100 * LOSS_REL_JUMP:.0f}%, "
                     f"> {LOSS_Z} robust SD and past the run's own noise ({LOSS_TAIL_MULTIPLE:g}x "
                     f"its {100 * LOSS_TAIL_QUANTILE:.0f}th-percentile jump so far, or "
                     f"{LOSS_NOISE_MULTIPLE:g}x the largest its median and 90th-percentile "
                     f"jumps predict) above the median of the previous {LOSS_WINDOW} steps"),
            fix=("if grad norms spike at the same steps: lower the LR, lengthen the warmup or "
                 "clip; if not: raise the micro-batch (fewer accumulation steps, same effective "
                 "batch) and check the data of those steps"),
            evidence={"spike_steps": [s["step"] for s in spikes][:50],
                      "worst": worst, "rule": {"window": LOSS_WINDOW,
                                               "relative_jump": LOSS_REL_JUMP, "z": LOSS_Z,
                                               "tail_multiple": LOSS_TAIL_MULTIPLE,
                                               "tail_quantile": LOSS_TAIL_QUANTILE,
                                               "noise_multiple": LOSS_NOISE_MULTIPLE}}))
    return findings


def _clipping(rec, summary: dict) -> list[Finding]:
    findings: list[Finding] = []
    grad = rec.grad
    clip_by_step, calls_by_step = _clips_by_step(rec)
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
            findings.append(_advice("grad_clip_every_step", "warning",
                message=(f"clip_grad_norm_(max_norm={_fmt(clip_sum['max_norm'])}) clipped "
                         f"{int(clipped.sum())} of {n} optimizer steps (median pre-clip norm "
                         f"{_fmt(med)}, {med / clip_sum['max_norm']:.1f}x max_norm): every "
                         "update is rescaled, the step size follows max_norm, not the LR"),
                fix=(f"set max_norm near the typical pre-clip norm (p90 "
                     f"{_fmt(clip_sum['pre_clip_norm']['p90'])}) so that it only catches "
                     "spikes, or lower the LR if the norms are large because training is "
                     "unstable"),
                evidence=dict(clip_sum)))
        # Clipping that never clipped is a safety net, not a problem: the summary (and the
        # report's health table) says "clipped 0 of N steps"; it is not a finding.
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
            findings.append(_advice("grad_clip_mismatch", "warning",
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
    return findings
