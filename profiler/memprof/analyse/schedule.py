"""The LR schedule against the optimizer steps (record.health's timeline): a scheduler or a
hand-set LR that advances per micro-batch under gradient accumulation, a scheduler stepped
before the optimizer, the warmup's length; apart from analyse.health, which calls it, as the
loss and gradient rules are apart from these."""
from __future__ import annotations

import math

import numpy as np

from ..finding import Finding
from .lr_range import range_test

#: windows in which the LR changed at every micro-step, at least, to read an LR set per
#: micro-batch from the windows where the LR moved (not all windows: a schedule counted in
#: micro-steps ends early and then holds its floor, which moves nothing); one change inside a
#: window is a one-off (a per-epoch scheduler.step() or an LR dropped by hand at an epoch's
#: end that falls inside an accumulation window)
LR_MOVED_MIN = 3


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


def fmt(x) -> str:
    """A number as the health findings print it ("-" for none)."""
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _advice(kind: str, severity: str, *, message: str, fix: str, evidence: dict) -> Finding:
    """A schedule finding: advice about training, with no bytes of its own."""
    return Finding(kind=kind, severity=severity, bytes=0, message=message, fix=fix,
                   holder=None, evidence=evidence)


def _lr_moves(window_lrs: list[list[tuple]]) -> tuple[int, int, int, int]:
    """(windows whose micro-steps ran at different LRs, of those the windows where the LR
    changed at every micro-step - as a schedule stepped per micro-batch moves it; three
    micro-steps at least, so that one change is not all there is -, windows where the LR
    moved at all - inside or since the window before -, windows with accumulation). A
    schedule counted in micro-steps that ended early and sits at its floor moves no LR after
    it ends: those windows say nothing either way; one stepped per epoch changes it once
    inside the windows that span an epoch's end."""
    changed = every = moved = 0
    last = None
    for lrs in window_lrs:
        inside = len(set(lrs)) > 1
        changed += inside
        every += len(lrs) >= 3 and all(a != b for a, b in zip(lrs, lrs[1:]))
        moved += inside or bool(lrs and last is not None and lrs[0] != last)
        if lrs:
            last = lrs[-1]
    return changed, every, moved, len(window_lrs)


def scheduler_findings(rec, summary: dict, warm, complete) -> list[Finding]:
    findings: list[Finding] = []
    tl = rec.timeline
    scheds: dict[int, dict] = {}
    opt_count: dict[int, int] = {}        # optimizer id -> optimizer steps so far
    last_opt: dict[int, int] = {}         # optimizer id -> timeline index of its last step
    last_activity = -1                    # timeline index of the last backward
    for i, ev in enumerate(tl):
        if ev[0] in ("F", "B"):
            # a backward marks a training iteration under way; forwards alone (an evaluation
            # pass before an epoch's scheduler.step()) do not
            if ev[0] == "B":
                last_activity = i
            continue
        if ev[0] == "O":
            opt_count[ev[2]] = opt_count.get(ev[2], 0) + 1
            last_opt[ev[2]] = i
            continue
        if ev[0] == "K":   # a skipped update (GradScaler): no optimizer step
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
    # micro-steps per optimizer window (forward -> backward transitions) and the LR of each
    # micro-step: of the forward its backward follows (an evaluation's forwards, with no
    # backward, ran before the step set its LR and are no micro-step)
    micro: list[int] = []
    window_lrs: list[list[tuple]] = []
    cur_micro, last_tok, lrs_seen, fwd_lr = 0, None, [], None
    for ev in tl:
        if ev[0] == "F":
            last_tok = "F"
            fwd_lr = tuple(ev[2]) if ev[2] else None
        elif ev[0] == "B":
            if last_tok == "F":
                cur_micro += 1
                if fwd_lr is not None:
                    lrs_seen.append(fwd_lr)
            last_tok = "B"
        elif ev[0] in ("O", "K"):   # (an iteration whose update GradScaler skipped ends too)
            micro.append(cur_micro)
            if cur_micro > 1:
                window_lrs.append(lrs_seen)
            cur_micro, last_tok, lrs_seen = 0, None, []
    lr_change_windows, every_windows, moved_windows, windows_with_micro = _lr_moves(window_lrs)
    micro_med = float(np.median(micro)) if micro else None
    if warm and len(micro) >= warm:   # counted, not the median times the steps: the
        # accumulation may change (4, then 8 read "3 optimizer steps = 18 micro-steps")
        summary["lr"]["warmup_micro_steps"] = int(sum(micro[:warm]))
    out = []
    for sid, info in scheds.items():
        n_opt = opt_steps.get(info["opt"], 0)
        counts = list(info["windows"].values())
        per_window = [info["windows"].get(w, 0) for w in range(n_opt + 1)]
        windows_multi = sum(1 for c in per_window[1:] if c >= 2)
        lr_sched = [x for x in info["lr_after"] if x is not None]
        swept = range_test(lr_sched) is not None   # (a range test: no warmup)
        s_warm = warmup_length(lr_sched)[0] if lr_sched and not swept else None
        out.append({"class": info["class"], "calls": info["calls"], "optimizer_steps": n_opt,
                    "calls_per_optimizer_step": info["calls"] / n_opt if n_opt else None,
                    "before_optimizer_calls": info["mid"] + info["before_first"],
                    "before_first_optimizer_step": info["before_first"],
                    "warmup_scheduler_steps": s_warm})
        per_micro = n_opt >= 2 and windows_multi >= 0.5 * max(1, n_opt - 1) and max(counts) >= 2
        if per_micro:
            ratio = info["calls"] / max(1, n_opt)
            warm_txt = ""
            if s_warm:   # from the scheduler's own steps: a warmup shorter than one
                # optimizer step is a fraction of one, not 0
                warm_txt = (f"; the warmup lasts {s_warm} scheduler steps = "
                            f"{round(s_warm / ratio, 1):g}{'' if complete else '+'} "
                            "optimizer steps")
            findings.append(_advice("lr_schedule_per_micro_step", "warning",
                message=(f"{info['class']}.step() ran {info['calls']} times for {n_opt} "
                         f"optimizer steps ({ratio:.1f} per step, {fmt(micro_med)} micro-steps "
                         f"per optimizer step): the schedule advances per micro-batch, so "
                         + (f"the LR range test's sweep runs {ratio:.1f}x too fast (each "
                            "optimizer step skips the LRs of its other micro-batches)"
                            if swept else
                            f"warmup and decay run {ratio:.1f}x too fast{warm_txt}")),
                fix=("call scheduler.step() once per optimizer step (inside the `if (i+1) % "
                     "accum == 0:` block, after optimizer.step()), or size warmup/total steps "
                     "in micro-steps on purpose"),
                evidence={"scheduler_steps": info["calls"], "optimizer_steps": n_opt,
                          "micro_steps_per_optimizer_step": micro_med,
                          "warmup_scheduler_steps": s_warm,
                          "warmup_optimizer_steps": warm}))
        elif (info["mid"] >= 1 and info["calls"] >= 2
              and info["mid"] + info["before_first"] >= 0.5 * info["calls"]):
            findings.append(_advice("scheduler_before_optimizer", "warning",
                message=(f"{info['class']}.step() was called before optimizer.step() in "
                         f"{info['mid'] + info['before_first']} of {info['calls']} "
                         "iterations: each optimizer step "
                         "uses the next step's LR and the schedule's first value is never "
                         f"used (first LR applied {fmt(summary['lr']['first'])})"),
                fix="call optimizer.step() first, then scheduler.step()",
                evidence={"scheduler_steps": info["calls"],
                          "before_optimizer": info["mid"] + info["before_first"],
                          "optimizer_steps": n_opt,
                          "first_lr_applied": summary["lr"]["first"]}))
        elif info["before_first"] > 0:
            findings.append(_advice("scheduler_stepped_before_first_optimizer_step", "info",
                message=(f"{info['class']}.step() ran {info['before_first']} time(s) before "
                         "the first optimizer step (a pre-step at start-up, or a GradScaler "
                         "that skipped the first step): the schedule's first value(s) were "
                         f"skipped (first LR applied {fmt(summary['lr']['first'])})"),
                fix=("do not pre-step the scheduler; with AMP a skipped first step is "
                     "harmless"),
                evidence={"before_first_optimizer_step": info["before_first"],
                          "first_lr_applied": summary["lr"]["first"]}))
    if (lr_change_windows and windows_with_micro >= 2
            and (lr_change_windows >= 0.5 * windows_with_micro
                 or (every_windows >= LR_MOVED_MIN
                     and every_windows >= 0.5 * moved_windows))
            and not any(f.kind == "lr_schedule_per_micro_step" for f in findings)):
        findings.append(_advice("lr_schedule_per_micro_step", "warning",
            message=(f"the learning rate changed between the micro-steps of "
                     f"{lr_change_windows} of {windows_with_micro} optimizer steps with "
                     f"gradient accumulation ({lr_change_windows} of the {moved_windows} in "
                     "which the LR moved at all): the LR is updated per micro-batch, so warmup "
                     "and decay are counted in micro-steps"
                     + (f" and the schedule ends {fmt(micro_med)}x too early"
                        if moved_windows < 0.5 * windows_with_micro else "")),
            fix="update the LR once per optimizer step, counting optimizer steps, not batches",
            evidence={"windows_with_lr_change": lr_change_windows,
                      "windows_with_lr_move": moved_windows,
                      "windows_with_accumulation": windows_with_micro,
                      "micro_steps_per_optimizer_step": micro_med}))
    summary["schedulers"] = out
    summary["micro_steps_per_optimizer_step"] = micro_med
    return findings
