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


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.ReLU(), nn.Linear(4 * WIDTH, 10))


def _estimates(prof) -> dict:
    return {o["precision"]: o["peak_allocated"] for o in prof.meta["fit"]["estimate"]["options"]
            if o.get("peak_allocated") is not None and o["checkpointing"] == "none"}


def test_accelerate_bf16_is_re_estimated_in_fp32_without_its_own_autocast():
    """The re-estimate copies the model, accelerate's autocast wrapper of its forward with it:
    the "fp32" row computed in bf16 (the same bytes as fp16's) where the model, unwrapped, takes
    as much as the same model under an autocast of the loop's own."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        model = _mlp()
        acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
        model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters()))
        wrapped_forward = model.forward
        with memprof.track(model, opt, budget="t4") as prof:
            for _ in range(2):
                out = model(torch.randn(1024, WIDTH))
                acc.backward(nn.functional.cross_entropy(out, torch.randint(0, 10, (1024,))))
                opt.step()
                opt.zero_grad()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert model.forward == wrapped_forward and "_original_forward" in model.__dict__
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters())
    with memprof.track(model, opt, budget="t4") as plain:
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(torch.randn(1024, WIDTH))
            nn.functional.cross_entropy(out.float(), torch.randint(0, 10, (1024,))).backward()
            opt.step()
            opt.zero_grad()
    got, want = _estimates(prof), _estimates(plain)
    assert got["fp32"] > got["fp16"]
    assert got == want
