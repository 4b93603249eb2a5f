"""`memprof.recommend(model=...)` of a model prepared by accelerate's
`Accelerator(mixed_precision=...)`: accelerate replaces `model.forward` with an autocast +
convert_outputs_to_fp32 wrapper. The estimator deep-copied the model with that wrapper, so
every precision it tried computed in the wrapper's: the 'fp32' row gave bf16/fp16 bytes.
(track()'s "what would fit" re-estimate had the same fault, fixed before; this is the Python
API's own path.)"""
import pytest
import torch
from torch import nn

import memprof
from memprof.plan.estimate import Estimator

pytestmark = pytest.mark.usefixtures("collect_garbage_after")

WIDTH = 128


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.ReLU(), nn.Linear(4 * WIDTH, 10))


def _batch(b):
    return (torch.randn(b, WIDTH),), torch.randint(0, 10, (b,))


def _prepared(mixed_precision):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        acc = accelerate.Accelerator(cpu=True, mixed_precision=mixed_precision)
        return acc.prepare(_mlp())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _peaks(model):
    plan = memprof.recommend(model=model, batch=_batch, gpu="a100-40gb", effective_batch=256,
                             precisions=["fp32", "bf16"], policies=["none"], workers=1)
    return {p: plan.predict(256, p, "none", accumulation=1).peak_allocated
            for p in ("fp32", "bf16")}


def test_recommend_estimates_an_accelerate_prepared_model_in_each_precision():
    # (bf16: on the CPU accelerate wraps no forward for fp16; its wrapper is the same one)
    model = _prepared("bf16")
    wrapper = model.forward
    assert "_original_forward" in model.__dict__
    got, want = _peaks(model), _peaks(_mlp())
    assert got["fp32"] > got["bf16"]
    assert got == want
    # the user's model keeps accelerate's wrapper
    assert model.forward == wrapper and "_original_forward" in model.__dict__


def test_estimator_copies_the_unwrapped_forward():
    model = _prepared("bf16")
    got = Estimator(model, _batch, gpu="a100-40gb").step(256, precision="fp32")
    want = Estimator(_mlp(), _batch, gpu="a100-40gb").step(256, precision="fp32")
    # (the first step's peak is the optimizer's state: the forward's bytes tell)
    assert got.bytes_allocated == want.bytes_allocated
    assert "_original_forward" in model.__dict__
