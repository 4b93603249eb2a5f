"""Analyses: pure functions of a Profile (queries over a Run) -> findings.

Each analysis is `f(profile) -> list[Finding] | Outcome`; `Outcome` adds notes (what could
not be fully checked) and stats (e.g. how long a check took). The leak check is the one
analysis that needs the run's live context (profile.run.live); it runs right after the block,
and the context is dropped once it has. `analyse()` runs them all and never raises into
training code: an analysis that fails is reported as "could not check".
"""
from __future__ import annotations

from ..finding import SEVERITY_ORDER, Finding, sort_findings
from .outcome import Outcome


def default_analyses() -> list:
    from .backward import backward_misuse
    from .batch_change import effective_batch_changed
    from .gradless_params import parameters_without_gradients
    from .growth import unexplained_growth
    from .health import health_analysis
    from .leaks import retained_graphs
    from .oom import out_of_memory
    from .partial_autocast import partial_autocast
    from .throughput import throughput_analysis
    from .untrained_grads import untrained_gradients
    return [retained_graphs, unexplained_growth, backward_misuse, throughput_analysis,
            health_analysis, out_of_memory, untrained_gradients, parameters_without_gradients,
            partial_autocast, effective_batch_changed]


def analyse(profile, analyses=None) -> None:
    """Run the analyses on a freshly recorded profile; attach findings, notes and stats."""
    for analysis in (default_analyses() if analyses is None else analyses):
        try:
            out = analysis(profile)
        except Exception as err:  # noqa: BLE001  (an analysis must never break training)
            profile.meta.setdefault("analysis_errors", []).append(
                f"{getattr(analysis, '__name__', analysis)} could not check: "
                f"{type(err).__name__}: {err}")
            continue
        if isinstance(out, Outcome):
            profile.findings.extend(out.findings)
            if out.notes:
                profile.meta.setdefault("analysis_errors", []).extend(out.notes)
            profile.meta.update(out.stats)
        else:
            profile.findings.extend(out)
    profile.findings[:] = sort_findings(profile.findings)
    profile.run.live = None  # don't keep the user's frame, model and locals alive


def findings(prof, min_severity: str = "warning") -> list[Finding]:
    """Findings at or above a severity, worst first: `assert not memprof.findings(prof)` makes
    a training smoke test fail when it leaks."""
    if min_severity not in SEVERITY_ORDER:
        raise ValueError(f"min_severity={min_severity!r}: expected one of "
                         f"{', '.join(SEVERITY_ORDER)}")
    limit = SEVERITY_ORDER[min_severity]
    return sort_findings([f for f in prof.findings
                          if SEVERITY_ORDER.get(f.severity, 9) <= limit])


def summary(profile) -> dict:
    """Everything as plain JSON-able data: the profile's summary plus the throughput and
    health summaries, the budget replay and what would fit where one was asked for, the
    parameters at the peak split into trainable and frozen, and the partial last step marked
    (what `memprof report --json` and `memprof run --json` print: one document, so that a CI
    script reads either the same way)."""
    from . import coverage, health, throughput, trainable
    out = profile.summary()
    out["throughput"] = throughput.summarize(profile)
    out["health"] = health.summarize(profile)
    out["budget"], out["fit"] = profile.meta.get("budget"), profile.meta.get("fit")
    out["not_counted"] = coverage.model_not_given(profile)
    # parameters at the peak: {"trainable": bytes, "frozen": bytes}, None where not noted
    out["parameters_at_peak"] = trainable.parameters_split(profile)
    _mark_partial_step(profile, out)
    return out


def _mark_partial_step(profile, data: dict) -> None:
    """What the terminal report marks "(partial)": `partial_last_step` (the last entry of
    `steps` is work after the last step boundary - an evaluation pass, a loop cut short - not
    a finished step) and `partial` on every step entry, so that a CI script reading the JSON
    does not take that remainder for the run's last step."""
    partial = profile.partial_last_step
    steps = data.get("steps") or []
    for i, step in enumerate(steps):
        step["partial"] = partial and i == len(steps) - 1
    data["partial_last_step"] = partial
