"""Gradients kept for parameters no optimizer updates (from record.untrained_grads): memory
as large as those parameters, spent on every backward and never freed by zero_grad()."""
from __future__ import annotations

from ..finding import Finding
from ..units import fmt_bytes

# below this share of the parameters' bytes it is said, not flagged (a small probe layer)
WARN_SHARE = 0.05


def untrained_gradients(profile) -> list[Finding]:
    rec = profile.run.records.get("untrained_gradients")
    if not rec or not rec.get("parameters"):
        return []
    n, nbytes, names = rec["parameters"], int(rec["bytes"]), rec.get("names") or []
    # (a loop in main() under `memprof run` freed them before the end: the look's own)
    params = int(profile.breakdown("category", at="end").get("parameters", 0)) or \
        int(rec.get("parameter_bytes") or 0)
    severity = "warning" if not params or nbytes >= WARN_SHARE * params else "info"
    steps, judged = judged_steps(profile, rec)
    when = "the last step" if judged >= steps else f"step {judged} of {steps}"
    shown = ", ".join(names) + (f" and {n - len(names)} more" if n > len(names) else "")
    return [Finding(
        kind="gradients_not_trained", severity=severity, bytes=nbytes,
        message=f"{n} parameter(s) that no optimizer updates got gradients, "
                f"{fmt_bytes(nbytes)} kept after {when}: {shown}",
        fix="freeze them with p.requires_grad_(False) (as LoRA's base weights: peft's "
            "get_peft_model does), or give them to the optimizer; its zero_grad() never "
            "clears gradients of parameters it does not hold",
        evidence={"parameters": n, "names": names, "steps": min(judged, steps),
                  "trained_parameters": rec.get("trained_parameters")})]


def judged_steps(profile, rec: dict) -> tuple[int, int]:
    """(the run's complete steps, the steps a record looked at the model after): a record of
    record.live_look made while the loop ran says how many had ended then; one made as the
    block ended judged them all."""
    steps = len(profile.steps) - bool(profile.partial_last_step)
    judged = rec.get("steps")
    return steps, steps if not isinstance(judged, int) else judged
