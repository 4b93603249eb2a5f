"""How backward was called: through the same graph twice, or with retain_graph=True (from the
calls record.steps.BackwardHook noted)."""
from __future__ import annotations

import collections

from ..finding import Finding
from ..profile import Profile


def backward_misuse(profile: Profile) -> list[Finding]:
    calls = profile.run.records.get("backward") or []
    findings = []
    # a root is its sequence number on its thread (the numbers count per thread)
    uses = collections.Counter((c.get("thread"), r) for c in calls for r in c["roots"])
    twice = [c for c in calls if any(uses[(c.get("thread"), r)] > 1 for r in c["roots"])]
    if twice:
        steps = sorted({c["step"] for c in twice})
        findings.append(Finding(
            kind="backward_twice", severity="info", bytes=0,
            message=f"backward ran more than once through the same graph (steps {steps[:5]}): "
                    "its saved tensors stay pinned until the last call",
            fix="sum the losses and call backward once, or drop retain_graph after the last use",
            evidence={"calls": len(twice)}))
    retained = [c for c in calls if c["retain_graph"]]
    # a leak finding that names the graph retain_graph kept already says it, with the holder
    explained = any(f.evidence.get("retain_graph") for f in profile.findings)
    if retained and not explained:
        steps = sorted({c["step"] for c in retained})
        findings.append(Finding(
            kind="retain_graph", severity="info", bytes=0,
            message=f"backward(retain_graph=True) in {len(retained)} call(s) (steps "
                    f"{steps[:5]}): each such graph keeps all its saved tensors until the last "
                    "reference to it is dropped",
            fix="drop retain_graph=True unless a second backward needs the same graph; if it "
                "was added to silence 'backward through the graph a second time', detach the "
                "state carried across steps instead",
            evidence={"calls": len(retained)}))
    return findings
