"""An LR range test (fastai's lr_find, Lightning's Tuner.lr_find, a hand-written sweep: the LR
multiplied by one factor at every step from 1e-7 to 1) is no warmup: the health table read
"warmup 79+ optimizer steps" and the divergence that ends every range test was an error whose
fix was "lengthen the warmup"."""
import math

import pytest
import torch
from rich.console import Console

import memprof
from memprof.analyse import lr_range
from tiny_mlp import MLP

pytestmark = pytest.mark.usefixtures("collect_garbage_after")

STEPS = 60
GAMMA = (1.0 / 1e-7) ** (1 / (STEPS - 1))


def sweep(make_sched, steps=STEPS, accum=1, lr=1e-7):
    """A range test of `steps` optimizer steps on a small regression task; the profile."""
    torch.manual_seed(0)
    model = MLP(32, 64, 4)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = make_sched(opt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=g)
    y = x @ (torch.randn(32, 4, generator=g) / math.sqrt(32))
    with memprof.track(model, opt, health=True) as prof:
        for i in range(steps * accum):
            j = (i * 32) % 256
            (torch.nn.functional.mse_loss(model(x[j:j + 32]), y[j:j + 32]) / accum).backward()
            if (i + 1) % accum == 0:
                opt.step()
                opt.zero_grad()
                if sched is not None:
                    sched.step()
                else:
                    for group in opt.param_groups:
                        group["lr"] *= GAMMA
    return prof


@pytest.mark.parametrize("make_sched", [
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: GAMMA ** s),
    lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=GAMMA),
    lambda opt: None,                                   # by hand: group["lr"] *= gamma
], ids=["LambdaLR", "ExponentialLR", "by-hand"])
def test_a_range_test_is_no_warmup_and_its_divergence_no_error(make_sched):
    prof = sweep(make_sched)
    lr = prof.health["lr"]
    assert lr["warmup_optimizer_steps"] is None and not lr["warmup_complete"]
    rt = lr["range_test"]
    assert rt["factor_per_step"] == pytest.approx(GAMMA, rel=1e-6)
    assert rt["first"] == pytest.approx(1e-7) and rt["last"] == pytest.approx(1.0)
    assert rt["steps"] == STEPS
    # the loss fell, then diverged at the high end: both said, with the LR of each
    low, div = rt["lowest_loss"], rt["diverged"]
    assert 0 < low["step"] < div["step"] and low["lr"] < div["lr"]
    assert low["lr"] == pytest.approx(1e-7 * GAMMA ** low["step"], rel=1e-6)
    # the divergence past the lowest loss is the sweep's end, not an error or a warning
    assert not memprof.findings(prof), [(f.kind, f.message) for f in prof.findings]
    ends = [f for f in prof.findings if f.kind in lr_range.DIVERGENCE_KINDS]
    assert ends and all(f.severity == "info" and "range test" in f.message
                        and "warmup" not in f.fix for f in ends)
    con = Console(record=True, width=400)
    prof.report(console=con)
    out = con.export_text()
    assert "LR range test, not a warmup" in out
    assert "warmup" not in out.replace("not a warmup", "")   # no "warmup 59+ optimizer steps"


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
def test_a_range_test_stepped_per_micro_batch_is_no_warmup():
    """accumulation 4, the scheduler stepped per micro-batch: the finding says the sweep runs
    4x too fast, not a warmup's length."""
    gamma = GAMMA ** 0.25

    def per_micro(opt):
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    torch.manual_seed(0)
    model = MLP(32, 64, 4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-7)
    sched = per_micro(opt)
    x, y = torch.randn(16, 32), torch.randn(16, 4)
    with memprof.track(model, opt, health=True) as prof:
        for i in range(20 * 4):
            (torch.nn.functional.mse_loss(model(x), y) / 4).backward()
            sched.step()
            if (i + 1) % 4 == 0:
                opt.step()
                opt.zero_grad()
    assert prof.health["lr"]["warmup_optimizer_steps"] is None
    f = [f for f in prof.findings if f.kind == "lr_schedule_per_micro_step"][0]
    assert "warmup" not in f.message and "range test" in f.message
    assert f.evidence["warmup_scheduler_steps"] is None


@pytest.mark.parametrize("lrs, expected", [
    ([1e-7 * 1.3 ** k for k in range(40)], True),
    ([1e-8] + [1e-8 * 1.85 * 1.36 ** k for k in range(59)], True),   # Lightning's first step
    ([1e-7 * 1.3 ** k for k in range(6)], False),             # too short to tell
    ([1e-3] + [1e-5 * 1.3 ** k for k in range(39)], False),   # falls at its first step
    ([1e-3 * 1.05 ** k for k in range(40)], False),            # 7x: not a sweep of decades
    ([0.1 * (k + 1) / 40 for k in range(40)], False),          # linear ramp: a warmup
    ([1e-7 * 1.3 ** min(k, 30) for k in range(40)], False),    # plateaus: a warmup's peak
    ([1e-7 * 1.3 ** k for k in range(30)] + [1e-7 * 1.3 ** (29 - k) for k in range(10)],
     False),                                                    # decays after its peak
])
def test_the_rule(lrs, expected):
    assert (lr_range.range_test(lrs) is not None) is expected


def test_lightnings_lr_find_is_a_range_test(tmp_path):
    """Tuner.lr_find (exponential mode, its default), 40 steps, a small regression."""
    L = pytest.importorskip("lightning")
    from lightning.pytorch.tuner import Tuner

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = MLP(32, 64, 4)
            self.lr = 1e-3

        def training_step(self, b, i):
            return torch.nn.functional.mse_loss(self.net(b[0]), b[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
    torch.manual_seed(0)
    x = torch.randn(1280, 32)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :4] * 2),
                                       batch_size=32)
    model = Net()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    with memprof.track(model, health=True) as prof:
        Tuner(trainer).lr_find(model, train_dataloaders=data, num_training=40,
                               early_stop_threshold=None)
    lr = prof.health["lr"]
    assert lr["warmup_optimizer_steps"] is None
    assert lr["range_test"]["first"] == pytest.approx(1e-8)
    assert lr["range_test"]["last"] == pytest.approx(1.0)
    assert not memprof.findings(prof), [(f.kind, f.message) for f in prof.findings]


def test_a_range_test_under_a_grad_scaler_that_skips_steps_is_no_warmup():
    """Mixed precision (Lightning's lr_find under precision="16-mixed"): the GradScaler skips
    the optimizer steps whose gradients overflow, the scheduler still steps, so the LRs the
    optimizer saw jump by the factor squared across each skip; the sweep read 'warmup 56+
    optimizer steps' and its divergence an error to 'lengthen the warmup'."""
    torch.manual_seed(0)
    model = MLP(32, 64, 4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-7, momentum=0.9)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=GAMMA)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    overflow = {17, 31}          # the scaled gradients overflow at these steps (as fp16's do)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=g)
    y = x @ (torch.randn(32, 4, generator=g) / math.sqrt(32))
    first = next(model.parameters())
    with memprof.track(model, opt, health=True) as prof:
        for i in range(STEPS):
            j = (i * 32) % 256
            loss = torch.nn.functional.mse_loss(model(x[j:j + 32]), y[j:j + 32])
            hook = first.register_hook(lambda g: g * math.inf) if i in overflow else None
            scaler.scale(loss).backward()
            if hook is not None:
                hook.remove()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            sched.step()
    assert prof.health["skipped_by_grad_scaler"] == sorted(overflow)
    lr = prof.health["lr"]
    assert lr["warmup_optimizer_steps"] is None, lr
    rt = lr["range_test"]
    assert rt["factor_per_step"] == pytest.approx(GAMMA, rel=1e-6)
    assert rt["steps"] == STEPS - len(overflow)
    assert rt["diverged"] is not None
    assert not memprof.findings(prof), [(f.kind, f.message) for f in prof.findings]


def test_the_rule_across_steps_a_grad_scaler_skipped():
    steps = [k for k in range(40) if k not in (9, 20, 21)]
    assert lr_range.range_test([1e-7 * 1.3 ** k for k in steps], steps) is not None
    # the same LRs read as consecutive steps rise by 1.3 and 1.69: no one factor
    assert lr_range.range_test([1e-7 * 1.3 ** k for k in steps]) is None
    # steps counted per micro-batch (4 an optimizer step): the factor is still per optimizer step
    steps4 = [4 * k + 3 for k in steps]
    assert lr_range.range_test([1e-7 * 1.3 ** k for k in steps], steps4)[
        "factor_per_step"] == pytest.approx(1.3)
