"""A model whose forward a framework wrapped in its own autocast, estimated without it.

accelerate's `prepare(model)` with `mixed_precision` sets the model's `forward` (an instance
attribute) to the class's forward under `torch.autocast`, and keeps the unwrapped one as
`model._original_forward` (what `accelerate.utils.extract_model_from_parallel` puts back).
An estimate (`Estimator`: `recommend`, fit's re-estimate) copies the model, its wrapper too:
every precision it tried then computed in the wrapper's (an "fp32" re-estimate of a bf16 run
took the bytes of fp16). The precision of an estimate is the estimator's to set, so the copy
is taken of the unwrapped forward (and a plain step's twin, `step_failure`, likewise).
"""
from __future__ import annotations

import contextlib

import torch

WRAPPED = "_original_forward"   # accelerate's name for the forward it wrapped


@contextlib.contextmanager
def unwrapped_forward(model: torch.nn.Module):
    """For the block, `model.forward` is the one accelerate wrapped (none wrapped: as it is);
    the instance's own attributes are put back as they were after it, also when it raises."""
    state = model.__dict__ if isinstance(model, torch.nn.Module) else {}
    if "forward" not in state or WRAPPED not in state:
        yield model
        return
    wrapper, original = state["forward"], state.pop(WRAPPED)
    state["forward"] = original
    try:
        yield model
    finally:
        state["forward"] = wrapper
        state[WRAPPED] = original
