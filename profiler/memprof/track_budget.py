"""The budget and out-of-memory part of `memprof.track()`, run once the block has exited.

* `budget=` ("v100-16gb", any `memprof.plan.gpus` name, or bytes): the recorded stream is
  replayed against that GPU (`memprof.plan.budget.replay`); the result lands in
  `profile.meta["budget"]`, and a finding when the run would not fit (or, growing, would run
  out later).
* A step that does not fit - the budget replay's failure, or an out-of-memory error of the
  block itself diagnosed as a step too big (`memprof.analyse.oom`) - gets `what would fit`
  (`memprof.plan.fit.what_fits`, estimates) in `profile.meta["fit"]`. So does a run in a
  precision the budget's GPU cannot run (bf16 on a V100), in those it can, with a finding.
* When the block raised after running out of memory, the diagnosis is printed to stderr
  before the traceback leaves the block; the exception itself is never touched.
"""
from __future__ import annotations

import sys

from .finding import Finding, sort_findings
from .units import fmt_bytes

FIXES = {
    "growth": "fix what keeps memory alive across steps (see the memory_growth and retained-"
              "graph findings): on this GPU the run would stop at the step named here",
    "step_too_big": "make the step smaller for this GPU: see 'what would fit' (a smaller "
                    "micro-batch with accumulation, checkpointing or AMP; estimated)",
    "single_request": "one request is larger than this GPU can hold: check the shape of that "
                      "op's output",
    "precision": "train in a precision this GPU runs: see 'what would fit' (fp16 with "
                 "GradScaler, or fp32; estimated)",
}


def check(budget) -> None:
    """Raise the one-line ValueError for a budget that is not a known GPU or a byte count."""
    if budget is not None:
        from .plan.budget import capacity_of
        from .plan.gpus import NoGPUError
        try:
            capacity_of(budget)
        except NoGPUError as err:   # 'auto' where no CUDA GPU is: the same one line
            raise ValueError(str(err)) from None


def budget_finding(result) -> Finding | None:
    """A finding for a run that would not fit the budget, or would run out later."""
    if result.failure:
        cause = result.failure["cause"]
        return Finding(kind="budget", severity="error", bytes=result.failure["request"],
                       message=f"{result.summary}; {cause['text']}",
                       fix=FIXES[cause["cause"]], evidence={"budget": result.budget})
    if result.projection and result.projection.get("step") is not None:
        return Finding(kind="budget", severity="warning",
                       bytes=result.projection["leak_bytes_per_step"],
                       message=result.summary, fix=FIXES["growth"],
                       evidence={"budget": result.budget})
    return None


def precision_finding(result) -> Finding | None:
    """A finding for a run in a precision the budget's GPU cannot run (bf16 on a V100)."""
    p = result.precision
    if not p or p["supported"]:
        return None
    return Finding(kind="budget", severity="warning", bytes=0,
                   message=p["text"], fix=FIXES["precision"],
                   evidence={"budget": result.budget, "precision": p["run"]})


def _oom_cause(profile) -> dict | None:
    f = next((f for f in profile.findings if f.kind == "out_of_memory"), None)
    return f.evidence if f is not None else None


def _fit_target(profile, budget, result):
    """(budget spec, usable bytes, label, step) of a step too big to fit, or None."""
    if result is not None and result.failure:
        if result.failure["cause"]["cause"] != "step_too_big":
            return None
        return budget, result.capacity, result.budget, result.failure["where"]["step"]
    if result is not None and result.precision and not result.precision["supported"]:
        # it fits, in a precision the GPU cannot run: what would, in those it can
        step = (result.peak or {}).get("step", 0)
        return budget, result.capacity, result.budget, int(step)
    oom = _oom_cause(profile)
    if oom is None or oom["cause"]["cause"] != "step_too_big":
        return None
    if oom["request"]["device"] == "cuda":
        from .plan.gpus import lookup, usable_bytes
        gpu = lookup("auto")
        return gpu, usable_bytes(gpu), gpu.name, oom["cause"]["step"]
    capacity = oom["memory"]["capacity"]
    if not capacity:
        return None
    return int(capacity), capacity, f"{fmt_bytes(capacity)} ({oom['memory']['capacity_source']})", \
        oom["cause"]["step"]


def plan(tracker, exc) -> None:
    """Budget replay and what would fit, for a finished (outermost) track() block."""
    apply(tracker.profile, tracker.budget, tracker.session)


def apply(profile, budget, session=None) -> None:
    """Replay `profile` against `budget` (None: none) and, for a step too big, add what would
    fit (re-estimated when `session` still holds the model). Never raises: a failure is a
    note in profile.meta["analysis_errors"]."""
    try:
        result = None
        if budget is not None:
            from .plan.budget import replay
            result = replay(profile, budget)
            profile.meta["budget"] = result.as_dict()
            found = [f for f in (budget_finding(result), precision_finding(result)) if f]
            if found:
                profile.findings[:] = sort_findings(profile.findings + found)
        target = _fit_target(profile, budget, result)
        if target is not None:
            from .plan.fit import what_fits
            model = optimizer = None
            if session is not None:
                model = session.model or _single_root(session)
                optimizer = session.steps.optimizer or next(iter(session.steps.watched()), None)
            fits = result is not None and result.fits
            if model is not None:
                print(f"memprof: the step {'cannot run there as recorded' if fits else 'does not fit'}"
                      "; estimating what would (fake tensors; Ctrl-C skips)", file=sys.stderr)
            spec, capacity, label, step = target
            profile.meta["fit"] = what_fits(profile, spec, capacity, label, step, model=model,
                                            optimizer=optimizer, scaled=not fits)
    except KeyboardInterrupt:   # Ctrl-C while estimating: the profile is still saved
        profile.meta.setdefault("analysis_errors", []).append(
            "budget / what would fit: interrupted (Ctrl-C)")
    except Exception as err:  # noqa: BLE001  (never break the user's exit path)
        profile.meta.setdefault("analysis_errors", []).append(
            f"budget / what would fit could not run: {type(err).__name__}: {err}")


def _single_root(session):
    roots = session.scope.root_modules()
    return roots[0] if len(roots) == 1 else None


def print_diagnosis(profile) -> None:
    """The out-of-memory diagnosis (and what would fit) on stderr; never raises."""
    if not profile.oom_events:
        return
    try:
        import memprof   # the package root dispatches to the report layer
        from rich.console import Console
        memprof.show(profile, console=Console(stderr=True), section="diagnosis")
    except Exception as err:  # noqa: BLE001
        print(f"memprof: could not print the out-of-memory diagnosis: {type(err).__name__}: "
              f"{err}", file=sys.stderr)
