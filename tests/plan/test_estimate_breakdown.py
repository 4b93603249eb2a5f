"""What an estimate's and a plan's category breakdown say for a LoRA-style model, whose
optimizer state is created lazily in the first step."""
import io

import torch
from tiny_mlp import LoRALinear
from rich.console import Console

import memprof
from memprof.plan.estimate import estimate_step
from memprof.report.plan import print_plan
from memprof.units import fmt_bytes

D = 256


def _lora():
    torch.manual_seed(0)
    return torch.nn.Sequential(LoRALinear(D), torch.nn.ReLU(), LoRALinear(D),
                               torch.nn.Linear(D, 10).requires_grad_(False))


def _batch(b):
    return (torch.randn(b, D),), torch.randint(0, 10, (b,))


def test_by_category_is_the_steady_state_peak_and_the_first_step_is_labelled():
    """by_category was taken at the first step's peak: optimizer_state 0 for a model whose
    AdamW state is created inside that step, next to a headline (the plan's) that is the
    steady state, where the state exists from the start."""
    e = estimate_step(_lora(), _batch, batch_size=512)
    state = e.profile.breakdown("category", at="end")["optimizer_state"]
    assert state > 0
    assert e.by_category["optimizer_state"] == state
    assert sum(e.by_category.values()) == e.steady_peak_allocated
    assert e.first_by_category.get("optimizer_state", 0) == 0     # said, and labelled
    assert sum(e.first_by_category.values()) == e.peak_allocated
    d = e.as_dict()
    assert d["by_category"] == e.by_category and d["first_by_category"] == e.first_by_category


def test_recommend_says_what_the_parameters_gradients_and_state_take():
    """The text gave no parameters / gradients / optimizer state for the best option: a LoRA
    user could not see that the frozen base, not what trains, is the size."""
    plan = memprof.recommend(_lora(), batch=_batch, gpu="a100-40gb", effective_batch=8,
                             precisions=["fp32"], policies=["none"], workers=1, confirm=False)
    trainable = 2 * (2 * D * 4)
    total = sum(p.numel() for p in _lora().parameters())
    out = io.StringIO()
    print_plan(plan, Console(file=out, width=300))
    line = next(ln for ln in out.getvalue().splitlines() if ln.startswith("  model state"))
    assert f"{trainable:,} of {total:,} parameters train" in line
    assert "gradients 16.00 KiB" in line      # fp32, trainable ones only
    combo = plan.as_dict()["combinations"][0]
    assert combo["gradients_bytes"] == 4 * trainable
    assert combo["optimizer_state_bytes"] == 2 * 4 * trainable + 4 * 4   # + 4 step counters
    assert plan.as_dict()["parameters_bytes"] == 4 * total
    from memprof.report.plan_html import plan_html
    assert f"{trainable:,} of {total:,} parameters train" in plan_html(plan)


def test_a_model_that_trains_all_its_parameters_says_all():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.ReLU(), torch.nn.Linear(D, 10))
    plan = memprof.recommend(model, batch=_batch, gpu="a100-40gb", effective_batch=8,
                             precisions=["fp32"], policies=["none"], workers=1, confirm=False)
    out = io.StringIO()
    print_plan(plan, Console(file=out, width=300))
    line = next(ln for ln in out.getvalue().splitlines() if ln.startswith("  model state"))
    total = sum(p.numel() for p in model.parameters())
    assert f"(all {total:,} train)" in line and " of " not in line.split("(")[1]


def test_an_ema_copy_inside_the_model_is_not_said_to_train():
    """A model that holds an EMA copy of itself (torch.optim.swa_utils.AveragedModel keeps
    requires_grad=True on the copy; a LightningModule with `self.ema`): the line read 'all
    136,724 train' beside the gradients of half of them; the copy never gets a gradient and
    no optimizer step moves it."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    class WithEma(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.ReLU(),
                                           torch.nn.Linear(D, 10))
            self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(0.99))

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    model = WithEma()
    assert all(p.requires_grad for p in model.ema.parameters())
    plan = memprof.recommend(model, batch=_batch, gpu="a100-40gb", effective_batch=8,
                             precisions=["fp32"], policies=["none"], workers=1, confirm=False)
    out = io.StringIO()
    print_plan(plan, Console(file=out, width=300))
    line = next(ln for ln in out.getvalue().splitlines() if ln.startswith("  model state"))
    trained = sum(p.numel() for p in model.net.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert f"({trained:,} of {total:,} parameters train)" in line, line
    assert f"gradients {fmt_bytes(4 * trained)}" in line
    assert plan.as_dict()["trainable_parameters"] == trained
