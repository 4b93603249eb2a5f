"""Parameters an optimizer updates that never got a gradient (from
record.gradless_params): they do not train, whatever the loss does."""
from __future__ import annotations

from ..finding import Finding
from ..units import fmt_bytes
from .untrained_grads import judged_steps

# below this share of the bytes the optimizers hold it is said, not flagged (a layer built
# and never called: a pretrained model's unused pooler)
WARN_SHARE = 0.05


def parameters_without_gradients(profile) -> list[Finding]:
    rec = profile.run.records.get("parameters_without_gradients")
    if not rec or not rec.get("parameters"):
        return []
    n, nbytes, names = rec["parameters"], int(rec["bytes"]), rec.get("names") or []
    held = int(rec.get("held_bytes") or 0)
    severity = "warning" if not held or nbytes >= WARN_SHARE * held else "info"
    steps, judged = judged_steps(profile, rec)
    within = f"{steps} step(s)" if judged >= steps else f"the first {judged} of {steps} steps"
    shown = ", ".join(names) + (f" and {n - len(names)} more" if n > len(names) else "")
    return [Finding(
        kind="parameters_without_gradients", severity=severity, bytes=nbytes,
        message=f"{n} parameter(s) ({fmt_bytes(nbytes)}) that an optimizer updates never got "
                f"a gradient in {within}, so they do not train: {shown}",
        fix="a checkpoint(..., use_reentrant=True) whose inputs need no gradient passes none "
            "to the weights inside it: use use_reentrant=False (or, for a frozen embedding, "
            "model.enable_input_require_grads()); a layer the forward never calls can be left "
            "out of the optimizer",
        evidence={"parameters": n, "names": names, "steps": min(judged, steps),
                  "held_bytes": held})]
