"""Throughput: step time split into data wait, forward, evaluation, backward and optimizer;
samples/s; micro-steps per optimizer step (gradient accumulation, detected, not assumed); GPU
utilisation.

Where the numbers come from
- Phase boundaries are the markers in the event stream: ``forward_start`` / ``forward_end``
  (the model's calls, record.scope), ``backward_start`` (native, first autograd node of a
  backward pass: any pass of the engine, torch.autograd.grad's too), ``backward_call`` and
  ``backward_end`` (record.steps' backward wrapper, before and after each backward() call),
  ``optimizer_start`` and ``step`` (optimizer step hooks, or ``prof.step()``), ``batch``
  (record.throughput: the leading dimension of the first tensor passed to the pass's module)
  and ``eval_batch`` (the same for a pass without gradients).
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
- evaluation: passes without gradients in a window that trains (a validation batch); in a
  window that only evaluates (inference) they are its forward;
- other: the rest of the wall time (loss computation, zero_grad, logging, ...);
- micro-steps: forward passes followed by a backward() call (a forward -> backward
  transition); the engine's other passes (torch.autograd.grad, torch.func.grad: a MAML inner
  loop, a gradient penalty) belong to the micro-step they run in, except in a step without any
  backward() call (a functional loop), where every pass counts, as before the call marker;
- samples: the micro-batch size of each micro-step, summed.
Statistics are medians with p10/p90 over the steps after ``warmup`` (default 1) warm-up steps,
leaving out the steps in which torch.compile compiled (record.compile_watch).
In a distributed run, communication (collectives in flight) and compute (the rest) are added
per step by analyse.communication.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..finding import Finding
from ..profile import Profile
from ..profile_schema import PAUSES
from .turns import round_samples, rounds
from .communication import add_to as _add_communication
from ..stats import describe as _stats

WARMUP_STEPS = 1
STARVATION_FRACTION = 0.20      # median data wait / step time above which a finding is made
MIN_WAIT_MS = 2.0               # a median wait shorter than this is not worth a finding
STEADY_FRACTION = 0.5           # the p10 step must wait at least this share of the threshold
#: steps measured (after the warm-up) before a wait is judged: the median of two is their mean,
#: so one step in which a loaded machine descheduled the process made a 3-step run 'wait'
MIN_MEASURED_STEPS = 3
#: the findings read from the wall clock (a loaded machine's descheduled steps move them)
TIMING_KINDS = ("data_loader_starvation", "host_time_between_steps")

PHASE_LABELS = ("forward_start", "forward_end", "backward_call", "backward_start",
                "backward_end",
                "optimizer_start", "step", "batch", "eval_batch", "data_start", "data_end",
                "update_start", "update_end", "reevaluation_start", "reevaluation_end")   # a hand-written update (record.update_watch)
COLUMNS = ("wall_ms", "data_ms", "forward_ms", "eval_ms", "backward_ms", "optimizer_ms",
           "other_ms")


def phase_table(entries, batch_override: int | None = None,
                pauses: dict[int, float] | None = None,
                data_spans: list | None = None) -> dict[str, list]:
    """Per-step phase times (ms) from time-ordered (label, t_ns, value) entries.

    One row per window that ends with a `step` entry; work after the last boundary is not a
    step. Values are None where a phase cannot be known (data wait of the first step).
    `pauses[i]`: seconds memprof itself spent just after the boundary that opens window i (a
    leak look): the window opens after them."""
    pauses = pauses or {}
    entries = list(entries)
    # a step with backward() calls marked counts only their passes as micro-steps; one
    # without (a functional loop's autograd.grad only, a profile from before the marker),
    # every pass of the engine
    calls, window = [False], 0
    passes_seen = any(label == "forward_start" for label, _, _ in entries)
    for label, t, _ in entries:
        if label == "step" and t is not None:
            calls.append(False)
            window += 1
        elif label == "backward_call":
            calls[window] = True
    rows: dict[str, list] = {c: [] for c in COLUMNS + ("loader_ms", "micro_steps", "samples",
                                                       "batch_size", "batch_min",
                                                       "batch_max")}
    prev_step_t = None
    w = _Window(prev_step_t, calls[0], passes_seen)
    for label, t, value in entries:
        if label in ("batch", "eval_batch"):
            w.batch(int(value), evaluating=label == "eval_batch")
            continue
        if label == "update_end":   # carries the time the update's last write returned
            w.update_end(int(value))
            continue
        if label == "update_start":   # carries the time the update began
            w.event("optimizer_start", int(value))
            continue
        if t is None:
            continue
        if label == "step":
            w.close(t)
            _append_row(rows, w, batch_override)
            if data_spans is not None:   # (analyse.communication: what overlaps them)
                data_spans.append(w.data_spans)
            prev_step_t = t + int(pauses.get(len(rows["wall_ms"]), 0.0) * 1e9)
            w = _Window(prev_step_t, calls[len(rows["wall_ms"])], passes_seen)
        else:
            w.event(label, t)
    return rows


class _Window:
    """State machine over the markers of one optimizer step."""

    def __init__(self, start_t, calls_marked: bool = False, passes_seen: bool = True):
        self.start_t = start_t
        # no pass of the model in the whole run (a LightningModule tracked itself: its
        # training_step calls self.net(x), never the module): each backward() is a micro-step
        self.passes_seen = passes_seen
        # backward() calls are marked ("backward_call"): only their passes train a group
        self.calls_marked = calls_marked
        self.gap_start = start_t          # where the current data-wait gap began
        self.first_t = None
        self.state = "outside"
        self.data = 0.0 if start_t is not None else None
        self.data_spans: list[tuple[int, int]] = []   # [start, end] ns of each part of it
        self.loader = 0.0                 # time inside DataLoader.__next__ (record.throughput)
        self.t0_loader = None
        self.fwd = self.bwd = self.opt = 0.0
        self.eval = 0.0                   # passes without gradients (a validation batch)
        self.pass_evaluates = False       # the running pass is one of those
        self.t0_fwd = self.t0_bwd = self.t0_opt = None
        # [batch or None, had_backward, batch of a pass without gradients or None]
        self.groups: list[list] = []
        self.last_token = None            # "F" or "B"
        self.end_t = None
        # an optimizer calls its closure again (LBFGS's line search): the same batch, timed
        # as forward and backward but no micro-step of its own (it read "3 micro-steps,
        # gradient accumulation" and 3x the samples/s)
        self.reevaluating = False

    def batch(self, n: int, evaluating: bool = False) -> None:
        """The size of the current group's first training pass (an evaluation pass before it
        in the group does not set it; it is the size only of a group that trains nothing)."""
        slot = 2 if evaluating else 0
        if evaluating and self.state == "forward":
            self.pass_evaluates = True
        if self.groups and self.groups[-1][slot] is None:
            self.groups[-1][slot] = n

    def event(self, label: str, t: int) -> None:
        if label == "data_start":
            self.t0_loader = t
            return
        if label == "data_end":
            if self.t0_loader is not None:
                self.loader += t - self.t0_loader
                self.t0_loader = None
            return
        if label in ("reevaluation_start", "reevaluation_end"):
            self.reevaluating = label == "reevaluation_start"
            return
        if self.first_t is None:
            self.first_t = t
        if label == "backward_call" or (label == "backward_start" and not self.calls_marked):
            # the pass that accumulates into .grad trains the group of the forward passes
            # before it; where backward() calls are marked, the engine's other passes
            # (autograd.grad, torch.func.grad: a MAML inner step, a gradient penalty) neither
            # train a group nor end one (the native backward_start may come before the call,
            # from a penalty's pass in the same backward phase)
            if self.last_token == "F" and self.groups:
                self.groups[-1][1] = True
            elif not self.passes_seen and not self.reevaluating:
                self.groups.append([None, True, None])
            self.last_token = "B"
        if label == "forward_start":
            if self.t0_opt is not None:           # optimizer.step(closure): LBFGS's next call
                self.opt += t - self.t0_opt
                self.t0_opt = None
            if self.state == "backward" and self.t0_bwd is not None:
                self.bwd += t - self.t0_bwd       # no backward_end seen: ends here
                self.t0_bwd = None
            elif self.gap_start is not None and self.state in ("outside", "after_backward"):
                self.data = (self.data or 0.0) + (t - self.gap_start)
                self.data_spans.append((self.gap_start, t))
            if self.last_token != "F" and not self.reevaluating:
                self.groups.append([None, False, None])
            self.last_token = "F"
            self.state = "forward"
            self.t0_fwd = t
            self.pass_evaluates = False
            self.gap_start = None
        elif label == "forward_end":
            if self.t0_fwd is not None:
                if self.pass_evaluates:
                    self.eval += t - self.t0_fwd
                else:
                    self.fwd += t - self.t0_fwd
                self.t0_fwd = None
            self.state = "after_forward"
        elif label == "backward_start":
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

    def update_end(self, t: int) -> None:
        """A hand-written update ended at t: what follows (the next batch) is not it."""
        if self.t0_opt is not None:
            self.opt += max(0, t - self.t0_opt)
            self.t0_opt = None
            self.state = "after_backward"
            self.gap_start = t

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
    rows["loader_ms"].append(w.loader * ms)
    # passes without gradients are evaluation beside a step that trains; in a step that
    # only evaluates (inference, prof.step()) they are its forward
    trains = any(g[0] is not None or g[1] for g in w.groups)
    fwd, ev = (w.fwd, w.eval) if trains else (w.fwd + w.eval, 0.0)
    rows["forward_ms"].append(fwd * ms)
    rows["eval_ms"].append(ev * ms)
    rows["backward_ms"].append(w.bwd * ms)
    rows["optimizer_ms"].append(w.opt * ms)
    known = w.fwd + w.eval + w.bwd + w.opt + (w.data or 0.0)
    rows["other_ms"].append(max(0.0, wall - known) * ms if wall is not None else None)
    trained = [g for g in w.groups if g[1]]
    groups = trained if trained else w.groups
    rows["micro_steps"].append(len(groups))
    if batch_override is not None:
        sizes = [batch_override] * len(groups)
    else:
        sizes = [g[0] if g[0] is not None else g[2] for g in groups]
    known_sizes = [s for s in sizes if s is not None]
    if groups and len(known_sizes) == len(sizes):
        rows["samples"].append(int(sum(known_sizes)))
        rows["batch_size"].append(float(np.median(known_sizes)))
        rows["batch_min"].append(int(min(known_sizes)))
        rows["batch_max"].append(int(max(known_sizes)))
    else:
        rows["samples"].append(None)
        for key in ("batch_size", "batch_min", "batch_max"):
            rows[key].append(None)


def _pauses(profile: Profile) -> dict[int, float]:
    """memprof's own pauses (the leak probe's looks, the autosaves) by the step whose window
    they open: its time, not the loop's."""
    looks: dict[int, float] = {}
    for name, key in PAUSES:
        for n, sec in (profile.run.records.get(name) or {}).get(key, ()):
            looks[int(n)] = looks.get(int(n), 0.0) + float(sec)
    return looks


def data_spans(profile: Profile, pauses: dict[int, float] | None = None) -> list[list]:
    """Per step, the [start, end] ns (host clock) of each part of its time before the forward,
    as the phase table sums them; the first step has none (it has no start)."""
    spans: list = []
    phase_table(_entries_from_profile(profile), None,
                _pauses(profile) if pauses is None else pauses, data_spans=spans)
    return spans


def micro_steps(profile: Profile) -> list[int]:
    """Micro-steps of each finished step, grouped as the throughput table groups them
    (forward passes then a backward; each backward() where no pass is seen)."""
    return phase_table(_entries_from_profile(profile))["micro_steps"]


def step_samples(profile: Profile) -> tuple[list, list[int]]:
    """(samples, micro-steps) of each finished step, as the throughput table counts them
    (samples None where a micro-batch's size is unknown)."""
    rows = phase_table(_entries_from_profile(profile))
    return rows["samples"], rows["micro_steps"]


def _entries_from_profile(profile: Profile) -> list[tuple[str, int, int]]:
    return [(m["label"], m["t_ns"], m["value"]) for m in profile.markers()
            if m["label"] in PHASE_LABELS]


def compute(entries, *, clock: str, warmup: int = WARMUP_STEPS,
            batch_override: int | None = None, gpu: dict | None = None,
            compiled_steps=(), pauses=None, skipped_steps=(), owners=None) -> dict[str, Any]:
    """The throughput summary (plain data) from time-ordered (label, t_ns, value) entries;
    `compiled_steps` (step indices) are left out like warm-up steps, and so are
    `skipped_steps` (a leak look's, on the CUDA clock); `pauses`: {step index: seconds
    memprof spent at the start of that step's window} (see phase_table); `owners`: per step,
    the optimizer that ended it (analyse.turns): samples/s per round where optimizers take
    turns."""
    rows = phase_table(entries, batch_override, pauses)
    n = len(rows["wall_ms"])
    # a run of warm-up steps only (one step: a smoke test, a run that ran out of memory in
    # its second) is measured on them, and says so, rather than over no step at all
    warm = min(warmup, n) if n > warmup else 0
    compiled = {int(i) for i in compiled_steps if warm <= int(i) < n}
    skipped = {int(i) for i in skipped_steps if warm <= int(i) < n} - compiled
    keep = [i for i in range(warm, n) if i not in compiled | skipped]
    pick = {k: [v[i] for i in keep] for k, v in rows.items()}
    stats = {k: _stats(pick[k]) for k in COLUMNS}
    # each phase's share of the measured steps' time (sums, not medians: the shares of the
    # phases add up to the step's, where medians' ratios added to 132 % in the demo)
    total_ms = sum(w for w in pick["wall_ms"] if w)
    for k in COLUMNS:
        if stats[k] is not None and total_ms > 0:
            stats[k]["share"] = sum(v for v in pick[k] if v) / total_ms
    stats["loader_ms"] = _stats(pick["loader_ms"])
    # the DataLoader's waits over the measured steps as a whole: with its workers batches
    # come in bursts, and a median step waits ~0 where the run waits most of its time
    waits = [d for d, w in zip(pick["loader_ms"], pick["wall_ms"]) if d is not None and w]
    totals = {"wall_ms": sum(w for w in pick["wall_ms"] if w), "loader_ms": sum(waits),
              "loader_wait_steps": sum(1 for d in waits if d >= MIN_WAIT_MS)}
    for col, name in (("data_ms", "data_fraction"), ("loader_ms", "loader_fraction")):
        stats[name] = _stats([d / w for d, w in zip(pick[col], pick["wall_ms"])
                              if d is not None and w])
    rates = _sample_rates(rows, keep, owners)
    stats["samples_per_s"] = _stats([r for r, _, _ in rates["measured"]])
    # steps in which the tracked model ran (a GAN's discriminator steps run no generator
    # pass: with them the median read "0 micro-steps per optimizer step")
    micro = [m for m in pick["micro_steps"] if m] or list(pick["micro_steps"])
    micro_med = float(np.median(micro)) if micro else None
    total_s = sum(s for _, s, _ in rates["measured"])
    total_w = sum(w for _, _, w in rates["measured"])
    bs = [b for b in pick["batch_size"] if b is not None]
    return {
        "clock": clock,
        # time inside DataLoader.__next__ was measured (record.throughput patches it)
        "data_loader_seen": any(e[0] == "data_start" for e in entries),
        "warmup_steps_excluded": warm,
        "warmup_measured": n > 0 and warm < min(warmup, n),   # first-step costs included
        "compile_steps_excluded": len(compiled),
        "leak_check_steps_excluded": len(skipped),
        "steps": n,
        "steps_measured": len(keep),
        "micro_steps_per_step": micro_med,
        # an epoch's last step with fewer micro-steps (64 batches by 4 -> ..., 4, 4, 2 in
        # an epoch of 10) is not the median: [fewest, most] over the steps measured
        "micro_steps_range": [int(min(micro)), int(max(micro))] if micro else None,
        "steps_with_micro_steps": sum(1 for m in pick["micro_steps"] if m),
        "gradient_accumulation": bool(micro_med is not None and micro_med > 1),
        "batch_size": float(np.median(bs)) if bs else None,
        # micro-batches of 32 and 64 have a median of 48, a size no step had: the range
        # says so
        "batch_size_range": ([min(b for b in pick["batch_min"] if b is not None),
                              max(b for b in pick["batch_max"] if b is not None)]
                             if bs else None),
        "batch_size_source": ("track(batch_size=...)" if batch_override is not None
                              else "leading dimension of the root module's first input"),
        "samples_per_s_overall": (total_s / (total_w * 1e-3)) if total_w else None,
        "totals": totals,
        # what samples/s is per: "step", or a round of steps where optimizers take turns
        # (per step, a GAN's batch counted once per optimizer read twice its rate)
        "samples_per_s_per": rates["per"],
        "stats": stats,
        "per_step": {k: [_round(x) for x in v]
                     for k, v in {**rows, "samples_per_s": rates["per_step"]}.items()},
        "gpu": gpu,
        "starvation_threshold": STARVATION_FRACTION,
    }


def _sample_rates(rows: dict[str, list], keep: list[int], owners) -> dict[str, Any]:
    """Samples/s per step, or per round where optimizers take turns (analyse.turns): the
    measured ones as (rate, samples, wall ms), one per step or round whose steps are all
    kept; each step's rate (its round's); what a rate is per ("step", or "round of N
    optimizers' steps")."""
    n = len(rows["wall_ms"])
    owners = list(owners)[:n] if owners is not None and len(owners) >= n else None
    groups = rounds(owners) if owners is not None else None
    kept = set(keep)
    measured, per_step = [], [None] * n
    for steps in groups or [[i] for i in range(n)]:
        walls = [rows["wall_ms"][i] for i in steps]
        samples = (round_samples(steps, owners, rows["samples"]) if groups
                   else rows["samples"][steps[0]])
        if samples is None or any(w is None for w in walls) or not sum(walls):
            continue
        rate = samples / (sum(walls) * 1e-3)
        for i in steps:
            per_step[i] = rate
        if all(i in kept for i in steps):
            measured.append((rate, samples, sum(walls)))
    per = f"round of {len(set(owners))} optimizers' steps" if groups else "step"
    return {"measured": measured, "per_step": per_step, "per": per}


def _round(x):
    return round(float(x), 4) if isinstance(x, (float, np.floating)) else x


def summarize(profile: Profile, warmup: int | None = None) -> dict[str, Any]:
    """Throughput of a profile as plain data (what `prof.throughput` returns): from the CUDA
    events when the run had them, else from the markers (host clock)."""
    rec = profile.run.records.get("throughput") or {}
    batch = rec.get("batch_override")
    warmup = WARMUP_STEPS if warmup is None else int(warmup)
    gpu = rec.get("gpu")
    compiled = (profile.run.records.get("compile") or {}).get("steps", ())
    looks = _pauses(profile)
    timeline = rec.get("cuda_timeline")
    owners = profile.run.records.get("step_owners")
    first = int(profile.run.records.get("first_step") or 0)   # a nested block's
    if owners is not None:
        owners = owners[first:]
    if timeline:
        # (leak looks left out: the GPU may have run queued work meanwhile)
        out = compute([tuple(x) for x in timeline], clock="cuda_events", warmup=warmup,
                      batch_override=batch, gpu=gpu, compiled_steps=compiled,
                      skipped_steps=looks, owners=owners)
    else:
        out = compute(_entries_from_profile(profile), clock="host", warmup=warmup,
                      batch_override=batch, gpu=gpu, compiled_steps=compiled,
                      pauses=looks, owners=owners)
        if rec.get("cuda"):
            out["note"] = f"CUDA events unavailable ({rec.get('cuda_error')}); host clock used"
    out["batch_override"] = batch
    out["loader_workers"] = int(rec.get("loader_workers") or 0)
    # distributed runs: collectives in flight per step, and during the data wait (its spans
    # by this table's rule, on the host clock the collectives are timed on)
    _add_communication(out, profile, lambda: data_spans(profile, looks))
    return out


#: with a DataLoader's workers: the share of the measured time spent waiting in its iterator
#: above which the run is starved though its median step waits ~0 (bursts: every Nth step
#: waits the batch's whole making), in at least this share of the steps
BURST_FRACTION = 0.5
BURST_STEPS = 0.1


def _bursty(summary: dict) -> str | None:
    """How a DataLoader with workers starves the loop in bursts (its share of the run's time
    and of the steps), or None: the median step waits ~0 there, and the median-based rule
    said nothing or the wrong share (53 % of each step where the run waited 94 %)."""
    totals = summary.get("totals") or {}
    measured = summary.get("steps_measured", 0)
    waits, wall = totals.get("loader_ms", 0.0), totals.get("wall_ms", 0.0)
    steps = totals.get("loader_wait_steps", 0)
    if not summary.get("loader_workers") or not wall or waits / wall < BURST_FRACTION or \
            steps < max(3, BURST_STEPS * measured):
        return None
    return (f"{100 * waits / wall:.0f}% of the measured time ({waits:.0f} of {wall:.0f} ms "
            f"over {measured} steps; the waits come in {steps} of them: its "
            f"{summary['loader_workers']} workers hand batches over in bursts, slower than "
            "the loop takes them)")


def _starved_finding(summary: dict, share: str) -> Finding:
    totals = summary["totals"]
    return Finding(
        kind="data_loader_starvation", severity="warning", bytes=0,
        message=f"the training loop waits inside the DataLoader's iterator {share}",
        fix=("more DataLoader workers (num_workers), cheaper per-sample work (decode, "
             "augmentation), persistent_workers=True and a larger prefetch_factor; the "
             "workers make batches slower than the loop consumes them"),
        evidence={"loader_fraction_total": totals["loader_ms"] / totals["wall_ms"],
                  "loader_ms_total": totals["loader_ms"], "wall_ms_total": totals["wall_ms"],
                  "steps_waiting": totals["loader_wait_steps"],
                  "steps": summary["steps_measured"],
                  "loader_workers": summary["loader_workers"],
                  "threshold": BURST_FRACTION, "measured_in": "DataLoader.__next__",
                  "warmup_steps_excluded": summary["warmup_steps_excluded"],
                  "clock": summary["clock"]})


def unmarked_steps(profile: Profile) -> str | None:
    """Why a run that trained has no step (several gradient passes, no boundary), or None:
    a torch.func.grad loop's parameters are copies made for the call (functional_call), so
    neither a backward() nor a change of the parameters it made gradients for is seen."""
    if len(profile.steps) > 1 or len(profile.markers("step")):   # (one real step: marked)
        return None
    passes = len(profile.markers("backward_start"))
    if passes < 2:
        return None
    return (f"{passes} gradient passes ran without a step boundary: steps end at "
            "optimizer.step(), or where a backward() or torch.autograd.grad over the "
            "parameters is followed by their change (a torch.func.grad loop is neither); mark "
            "them with prof.step(), or `memprof run --step-on FUNCTION` (a step per return "
            "of your training-step function)")


def starvation_findings(summary: dict) -> list[Finding]:
    """Waiting that dominates the step: inside the DataLoader's iterator when one fed the loop
    (data_loader_starvation), else host time between steps named as such - never blamed on a
    data loader that was not there - and only when the wait itself is long enough to matter."""
    st = summary.get("stats") or {}
    if summary.get("steps_measured", 0) < MIN_MEASURED_STEPS or summary.get("warmup_measured"):
        return []
    loader = bool(summary.get("data_loader_seen"))
    frac = st.get("loader_fraction" if loader else "data_fraction")
    wait, wall = st.get("loader_ms" if loader else "data_ms"), st.get("wall_ms")
    if not (frac and wait and wall):
        return []
    # A loop that waits for data waits in nearly every step; waits in only some steps are the
    # process descheduled on a busy machine (seen in tests/corpus), not a slow loader - unless
    # a DataLoader's workers hand batches over in bursts (_bursty)
    steady = frac["median"] > STARVATION_FRACTION and wait["median"] >= MIN_WAIT_MS and \
        frac["p10"] > STEADY_FRACTION * STARVATION_FRACTION
    if not steady:
        bursty = _bursty(summary) if loader else None
        if bursty is None:
            return []
        return [_starved_finding(summary, bursty)]
    clock = ("GPU idle time (CUDA events)" if summary["clock"] == "cuda_events"
             else "host time")
    compiled = summary.get("compile_steps_excluded")
    rule = (f"{clock}, over {summary['steps_measured']} steps after "
            f"{summary['warmup_steps_excluded']} warm-up step(s)"
            + (f" and without {compiled} step(s) that compiled" if compiled else "")
            + "; threshold "
            f"{100 * STARVATION_FRACTION:.0f}% of the median step and {MIN_WAIT_MS:g} ms")
    share = (f"{100 * frac['median']:.0f}% of each step (median {wait['median']:.1f} ms of "
             f"{wall['median']:.1f} ms, p90 {100 * frac['p90']:.0f}%; {rule})")
    evidence = {"data_fraction_median": frac["median"], "data_fraction_p90": frac["p90"],
                "data_ms_median": wait["median"], "step_ms_median": wall["median"],
                "threshold": STARVATION_FRACTION, "min_wait_ms": MIN_WAIT_MS,
                "steps": summary["steps_measured"], "measured_in": (
                    "DataLoader.__next__" if loader else "between steps, no DataLoader"),
                "warmup_steps_excluded": summary["warmup_steps_excluded"],
                "clock": summary["clock"]}
    if loader:
        return [Finding(
            kind="data_loader_starvation", severity="warning", bytes=0,
            message=f"the training loop waits inside the DataLoader's iterator {share}",
            fix=("DataLoader(num_workers=N (about the CPU cores per GPU), pin_memory=True "
                 "with .to(device, non_blocking=True), persistent_workers=True, "
                 "prefetch_factor=4); move per-sample decoding/augmentation out of the "
                 "training loop"),
            evidence=evidence)]
    return [Finding(
        kind="host_time_between_steps", severity="info", bytes=0,
        message=(f"the loop spends {share} on the host between steps, outside any DataLoader "
                 "(none was iterated while tracking): batch creation, logging, metric or "
                 "EMA updates"),
        fix=("if that time prepares data, move it into a Dataset served by a DataLoader with "
             "workers; otherwise it is the loop's own work (profile it with py-spy or "
             "torch.profiler to see which)"),
        evidence=evidence)]


def throughput_analysis(profile: Profile) -> list[Finding]:
    """Default analysis: is the loop waiting for data (or for the host) most of each step?"""
    return starvation_findings(summarize(profile))
