"""Shared assertions of the framework-callback tests (a helper, not a test module)."""
import glob
import os

import memprof

F32 = 4


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def saved_profile(directory: str) -> memprof.Profile:
    found = glob.glob(os.path.join(directory, "*.memprof"))
    assert len(found) == 1, found
    return memprof.load(found[0])


def check_profile(prof, model, steps: int = 3) -> None:
    """3 optimizer steps; parameters x1, gradients x1 (just before the last update) and AdamW
    state x2 (+ its step counters) of the model's parameter bytes."""
    assert len(prof.marker_positions("step")) == steps      # one per optimizer update
    # the framework's work after the last update (its loss bookkeeping, end-of-training
    # summary) is recorded, but no step: the profile's steps are the framework's
    assert len(prof.steps) == steps and prof.steps_label == str(steps)
    P = param_bytes(model)
    n = len(list(model.parameters()))
    end = prof.breakdown("category", at="end")
    assert end["parameters"] == P
    assert end["optimizer_state"] in (2 * P, 2 * P + n * F32)   # exp_avg, exp_avg_sq, step
    last_update = int(prof.marker_positions("optimizer_start")[-1]) - 1
    assert prof.breakdown("category", at=("position", last_update))["gradients"] == P


def retained(prof, holder: str):
    found = [f for f in memprof.findings(prof) if f.kind == "retained_graph"]
    assert found, [f.kind for f in memprof.findings(prof)]
    assert any(holder in str(f.evidence) or holder in f.message for f in found), \
        [f.message for f in found]
    return found
