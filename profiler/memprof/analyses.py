"""The analyses that run on every profile when a track() block exits.

Each analysis is `f(profile, tracker) -> list[Finding]`; it may look at live Python state
through the tracker (e.g. the garbage collector for retained graphs) and must not raise into
training code (track() catches and records any error as "could not check").
"""
from __future__ import annotations

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def default_analyses() -> list:
    from .graph import backward_misuse, retained_graphs
    from .growth import memory_growth
    from .health import health_analysis          # throughput / training health (issue 7)
    from .throughput import throughput_analysis
    return [retained_graphs, memory_growth, backward_misuse, throughput_analysis,
            health_analysis]


def findings(prof, min_severity: str = "warning") -> list:
    """Findings at or above a severity, worst first: `assert not memprof.findings(prof)` makes
    a training smoke test fail when it leaks."""
    if min_severity not in SEVERITY_ORDER:
        raise ValueError(f"min_severity={min_severity!r}: expected one of "
                         f"{', '.join(SEVERITY_ORDER)}")
    profile = getattr(prof, "profile", None) or prof
    limit = SEVERITY_ORDER[min_severity]
    out = [f for f in profile.findings if SEVERITY_ORDER.get(f.severity, 9) <= limit]
    return sort_findings(out)


def sort_findings(findings: list) -> list:
    """Most severe first, then the most bytes."""
    return sorted(findings, key=lambda f: (SEVERITY_ORDER.get(f.severity, 9), -f.bytes))
