"""An effective batch (samples per optimizer step) that changed mid-run while the LR went on
as before: seeds/003 grew its batch 16x and cut its LR, seeds/001 halved the micro-batch and
doubled the accumulation to keep it. The LR is usually tuned for the effective batch (scaled
linearly for SGD, by the square root for Adam), so a change that the LR does not follow is
named, with the step and both batches; growing the batch instead of decaying the LR on
purpose is the one reason to leave it. Read from the throughput's samples per step (micro-
steps where the batch size is unknown) and the health records' LR (health=True)."""
from __future__ import annotations

import math

from ..finding import Finding
from .throughput import step_samples

#: steps an effective batch must hold before and after a change to be one (an epoch's last
#: step with fewer micro-steps, 4, 4, 2, 4, 4, is no change)
HOLD_STEPS = 3
#: the LR followed the change when it moved, against its own pace before the change, by at
#: least this power of the batch's ratio (a quarter: square-root scaling moves it by a half)
FOLLOWED_POWER = 0.25
#: a change is by this factor at least (a drifting batch - token-based batches sorted by
#: length - moves by less, step after step)
MIN_RATIO = 1.5
#: ... in a run that holds few effective batches for most of its steps: a schedule of
#: changes, not batches that vary
MAX_HELD_VALUES = 3
MIN_HELD_SHARE = 0.8


def effective_batch_changed(profile) -> list[Finding]:
    health = profile.run.records.get("health")
    if not health:
        return []
    first = int(profile.run.records.get("first_step") or 0)
    lrs = {int(s) - first: lr[0] for s, _, _, lr in health["grad"] if lr}
    samples, micro = step_samples(profile)
    known = all(x is not None for x in samples)
    size = samples if known else micro
    findings = []
    for before, after in _changes(size):
        step = after[0]
        a, b = size[before[0]], size[step]
        if not a or not b or step not in lrs or (step - 1) not in lrs:
            continue
        jump = lrs[step] / lrs[step - 1] if lrs[step - 1] else None
        pace = (lrs[step - 1] / lrs[step - 2]
                if (step - 2) in lrs and lrs[step - 2] else 1.0)
        if jump is None or not math.isfinite(jump) or jump <= 0:
            continue
        ratio = b / a
        moved = math.log(jump / pace)
        if moved * math.log(ratio) > 0 and abs(moved) >= FOLLOWED_POWER * abs(math.log(ratio)):
            continue   # the LR was rescaled with the batch
        what = (f"effective batch {a} -> {b} samples" if known else
                f"micro-steps per optimizer step {a} -> {b}")
        findings.append(Finding(
            kind="effective_batch_changed", severity="warning", bytes=0,
            message=(f"the {what} at optimizer step {step} (micro-steps "
                     f"{micro[before[0]]} -> {micro[step]}) while the LR went on as before "
                     f"(x{jump:.3g} at that step, x{pace:.3g} the step before): the LR tuned "
                     f"for {a} now steps {b}" + ("" if known else " micro-batches")),
            fix=(f"scale the LR with the effective batch (x{ratio:.3g} linear, "
                 f"x{math.sqrt(ratio):.3g} square root for Adam) or keep micro-batch x "
                 "accumulation fixed; nothing if growing the batch replaces an LR decay"),
            evidence={"step": step, "samples_before": samples[before[0]],
                      "samples_after": samples[step], "micro_steps_before": micro[before[0]],
                      "micro_steps_after": micro[step], "lr_before": lrs[step - 1],
                      "lr_after": lrs[step], "lr_pace_before": pace}))
    return findings


def _changes(size: list) -> list[tuple[list[int], list[int]]]:
    """Consecutive runs of one value, each held HOLD_STEPS steps or more (shorter ones, a
    short last step of an epoch, are skipped), whose values differ: (steps before, after)."""
    runs: list[list[int]] = []
    for i, v in enumerate(size):
        if runs and size[runs[-1][0]] == v and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    held = [r for r in runs if len(r) >= HOLD_STEPS and size[r[0]] is not None]
    if (len({size[r[0]] for r in held}) > MAX_HELD_VALUES
            or sum(map(len, held)) < MIN_HELD_SHARE * len(size)):
        return []
    return [(p, q) for p, q in zip(held, held[1:]) if size[p[0]] and size[q[0]]
            and abs(math.log(size[q[0]] / size[p[0]])) >= math.log(MIN_RATIO)]
