"""An autocast the forward entered around part of itself only (record.pass_autocast): the
run keeps its weights' dtype, and the user is told why it does not read as mixed precision."""
from __future__ import annotations

from ..finding import Finding

_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


def _short(dtype: str) -> str:
    return _SHORT.get(dtype, dtype)


def partial_autocast(profile) -> list[Finding]:
    rec = profile.run.records.get("inputs") or {}
    partial = rec.get("autocast_partial")
    if not partial:
        return []
    amp = ", ".join(f"{_short(d)} on {dev}" for dev, d in partial["autocast"].items())
    weights = rec.get("weights") or {}
    dtype = _short(max(weights, key=weights.get)) if weights else "fp32"
    return [Finding(
        kind="partial_autocast", severity="info", bytes=0,
        message=f"autocast ({amp}) ran only {partial['share']:.0%} of the parameters the "
                f"first forward pass used (the forward enters it around part of itself): the "
                f"run reads as {dtype}, its weights' dtype, and budgets and re-estimates plan "
                "it so, the model's own autocast kept where its code enters it",
        fix="nothing, if intended; for a mixed-precision step put autocast around the whole "
            "forward (and the loss)",
        evidence=dict(partial))]
