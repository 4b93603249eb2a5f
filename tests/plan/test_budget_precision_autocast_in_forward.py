"""A forward that enters autocast itself - accelerate's `prepare(model)` with
`mixed_precision="bf16"` wraps the model's forward in `torch.autocast`, a model may do `with
torch.autocast(...)` in its own forward - computes in bf16 although autocast is off when the
model is called. memprof read the autocast state at that call only: the run read as fp32
(`meta["budget"]["precision"]["run"] == "fp32"`, source "weights"), so a bf16 LoRA run
against a T4 or V100 got no word that the GPU lacks bf16, and "what would fit" re-estimated
it in fp32."""
import pytest
import torch
from torch import nn

import memprof

pytestmark = pytest.mark.usefixtures("collect_garbage_after")

WIDTH = 128


class AutocastInside(nn.Module):
    """An MLP whose forward runs under bf16 autocast it enters itself."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.body(x).float()


def _loop(model, opt, budget="t4", backward=None, steps=2):
    with memprof.track(model, opt, budget=budget) as prof:
        for _ in range(steps):
            out = model(torch.randn(16, WIDTH))
            loss = nn.functional.cross_entropy(out, torch.randint(0, 10, (16,)))
            (backward or torch.Tensor.backward)(loss)
            opt.step()
            opt.zero_grad()
    return prof


def _assert_bf16_flagged(prof):
    precision = prof.meta["budget"]["precision"]
    assert precision["run"] == "bf16" and precision["source"] == "autocast", precision
    assert not precision["supported"]
    assert any(f.kind == "budget" and "no bf16" in f.message for f in prof.findings)


def test_autocast_entered_in_the_models_own_forward_is_the_runs_precision():
    torch.manual_seed(0)
    model = AutocastInside()
    prof = _loop(model, torch.optim.AdamW(model.parameters()))
    _assert_bf16_flagged(prof)


def test_accelerate_mixed_precision_bf16_is_the_runs_precision():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))
        acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
        model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters()))
        prof = _loop(model, opt, backward=acc.backward)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    _assert_bf16_flagged(prof)


def test_autocast_switched_off_inside_the_forward_leaves_an_fp32_run_fp32():
    """Hugging Face's rotary embeddings enter `autocast(enabled=False)` in every forward."""
    class OffInside(AutocastInside):
        def forward(self, x):
            with torch.autocast("cpu", enabled=False):
                return self.body(x)

    torch.manual_seed(0)
    model = OffInside()
    prof = _loop(model, torch.optim.AdamW(model.parameters()))
    assert prof.meta["budget"]["precision"]["run"] == "fp32"
    assert not any(f.kind == "budget" and "no bf16" in f.message for f in prof.findings)


def test_autocast_entered_outside_a_pass_does_not_count():
    """An autocast after the forward (a loss computed under it) is no precision of the
    model's step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))
    opt = torch.optim.AdamW(model.parameters())
    with memprof.track(model, opt, budget="t4") as prof:
        for _ in range(2):
            out = model(torch.randn(16, WIDTH))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(out, torch.randint(0, 10, (16,)))
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert prof.meta["budget"]["precision"]["run"] == "fp32"
