"""Training health (track(health=True)): clipping, LR and schedulers, loss spikes, non-finite
values; exactness (results unchanged) and clean removal."""
import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch.nn.utils import clip_grad_norm_ as preimported_clip  # bound before any tracking

import memprof
from rich.console import Console
from tiny_mlp import MLP
from memprof.analyse import health as hl
from memprof.analyse.throughput import TIMING_KINDS
from memprof.record import health as health_recorder

D, H, C = 32, 64, 4


pytestmark = pytest.mark.usefixtures("collect_garbage_after")

HEALTH_KINDS = {"nonfinite_loss", "nonfinite_gradients", "loss_spikes", "grad_clip_every_step",
                "grad_clip_inactive", "grad_clip_mismatch", "scheduler_before_optimizer",
                "scheduler_stepped_before_first_optimizer_step", "lr_schedule_per_micro_step"}


def setup(lr=0.05, seed=0):
    torch.manual_seed(seed)
    model = MLP(D, H, C)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return model, opt


def dataset(n=512, seed=1):
    """A fixed, learnable regression task (batches cycle through it: low-noise loss)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    w = torch.randn(D, C, generator=g) / math.sqrt(D)
    return x, x @ w


def batch(data, i, b=64):
    x, y = data
    j = (i * b) % x.shape[0]
    return x[j:j + b], y[j:j + b]


def kinds(prof):
    return [f.kind for f in prof.findings]


def find(prof, kind):
    fs = [f for f in prof.findings if f.kind == kind]
    assert len(fs) == 1, kinds(prof)
    return fs[0]


def warmup_cosine(warmup, total):
    def f(s):
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    return f


def tracked_health(steps, step, b=16):
    """`steps` batches of the regression task, each through step(model, opt, x, y, i), under
    track(health=True); the profile."""
    model, opt = setup()
    data = dataset()
    with memprof.track(model, opt, health=True) as prof:
        for i in range(steps):
            x, y = batch(data, i, b=b)
            step(model, opt, x, y, i)
    return prof


def train_with_accumulation(model, opt, sched, steps, accum, b):
    """`steps` optimizer steps of `accum` micro-steps each, the scheduler stepped after each
    optimizer step (the correct loop), under track(health=True)."""
    data = dataset()
    with memprof.track(model, opt, health=True) as prof:
        for i in range(steps * accum):
            x, y = batch(data, i, b=b)
            (torch.nn.functional.mse_loss(model(x), y) / accum).backward()
            if (i + 1) % accum == 0:
                opt.step()
                sched.step()
                opt.zero_grad()
    return prof


# ------------------------------------------------------------------ the correct loop
@pytest.mark.parametrize("scaled", ["divided", "multiplied"])
def test_the_loss_shown_is_the_models_not_the_accumulation_scaled_one(scaled):
    """`(loss / accum).backward()` (accelerate's backward too): the table showed 1.566 for a
    loss of 6.25 with accumulation 4. The scaling by the micro-steps is undone and said."""
    model, opt = setup()
    data, accum, true = dataset(), 4, {}
    with memprof.track(model, opt, health=True) as prof:
        for i in range(3 * accum):
            x, y = batch(data, i, b=16)
            loss = torch.nn.functional.mse_loss(model(x), y)
            true.setdefault(i // accum, []).append(loss.item())
            (loss / accum if scaled == "divided" else loss * (1 / accum)).backward()
            if (i + 1) % accum == 0:
                opt.step()
                opt.zero_grad()
    h = prof.health
    assert h["per_step"]["loss"] == pytest.approx([sum(v) / accum for v in true.values()],
                                                  rel=1e-5)
    assert "times 4" in h["loss_source"]


def test_a_loss_scaled_otherwise_is_shown_as_computed():
    """Halving a loss without accumulation (a weighted term), or dividing by a tensor (a
    normalisation), is the user's loss: shown as it is."""
    model, opt = setup()
    data, shown = dataset(), []
    with memprof.track(model, opt, health=True) as prof:
        for i in range(4):
            x, y = batch(data, i, b=16)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss = loss / 2 if i % 2 else loss / torch.tensor(3.0)
            shown.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
    h = prof.health
    assert h["per_step"]["loss"] == pytest.approx(shown, rel=1e-6)
    assert h["loss_source"] == "root of backward"


def test_correct_loop_with_warmup_cosine_and_accumulation_has_no_findings():
    model, opt = setup(lr=0.05)
    steps, accum, warmup = 30, 2, 5
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, steps))
    prof = train_with_accumulation(model, opt, sched, steps, accum, b=32)
    assert not [k for k in kinds(prof) if k in HEALTH_KINDS], prof.findings
    assert not memprof.findings(prof), prof.findings
    h = prof.health
    assert h["steps"] == steps and h["loss_source"] == (
        "root of backward times 2: the loss was divided by the 2 micro-steps of each "
        "optimizer step")
    assert h["lr"]["warmup_optimizer_steps"] == warmup - 1 and h["lr"]["warmup_complete"]
    assert h["lr"]["peak"] == pytest.approx(0.05)
    assert h["lr"]["first"] == pytest.approx(0.05 / warmup)
    assert h["schedulers"][0]["calls"] == steps
    assert h["schedulers"][0]["before_optimizer_calls"] == 0
    assert h["micro_steps_per_optimizer_step"] == accum
    assert h["loss"]["last"] < h["loss"]["first"]
    assert all(g is not None and math.isfinite(g) for g in h["per_step"]["grad_norm"])


# ------------------------------------------------------------------ gradient clipping
def run_clipped(max_norm, steps=10, clip=torch.nn.utils.clip_grad_norm_):
    model, opt = setup()
    data = dataset()
    returned = []
    seen = []
    with memprof.track(model, opt, health=True) as prof:
        for i in range(steps):
            x, y = batch(data, i)
            torch.nn.functional.mse_loss(model(x), y).backward()
            returned.append(float(clip(model.parameters(), max_norm)))
            seen.append(float(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters()]))))
            opt.step()
            opt.zero_grad()
    return prof, returned, seen


def test_clipping_active_on_every_step():
    prof, returned, seen = run_clipped(max_norm=1e-3)
    h = prof.health
    assert h["per_step"]["grad_norm_pre_clip"] == pytest.approx(returned)
    assert h["per_step"]["grad_norm"] == pytest.approx(seen, rel=1e-5)
    assert h["per_step"]["grad_norm"] == pytest.approx([1e-3] * 10, rel=1e-3)
    assert h["per_step"]["clipped"] == [True] * 10
    f = find(prof, "grad_clip_every_step")
    assert f.severity == "warning" and "10 of 10" in f.message and "max_norm=0.001" in f.message
    assert f.evidence["steps_clipped"] == 10 and f.fix


def test_clipping_never_active():
    prof, returned, seen = run_clipped(max_norm=1e6)
    h = prof.health
    assert h["per_step"]["clipped"] == [False] * 10
    # not clipped: the optimizer sees the pre-clip norm
    assert h["per_step"]["grad_norm"] == pytest.approx(returned, rel=1e-5)
    # a clip that never clipped is a safety net: stated in the summary, not a finding
    assert h["clipping"]["steps_clipped"] == 0 and h["clipping"]["steps_with_clip"] == 10
    assert [f for f in prof.findings if f.kind not in TIMING_KINDS] == []   # (not the clock's)


def test_clip_imported_before_tracking_is_seen():
    prof, returned, _ = run_clipped(max_norm=1e-3, clip=preimported_clip)
    assert prof.health["per_step"]["grad_norm_pre_clip"] == pytest.approx(returned)
    assert prof.health["clipping"]["calls_per_step_max"] == 1
    assert "grad_clip_every_step" in kinds(prof)


@pytest.mark.skipif(not hasattr(torch.nn.utils, "get_total_norm"), reason="torch < 2.6")
def test_two_stage_clipping_api_is_seen():
    def clip(params, max_norm):
        params = list(params)
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total
    prof, returned, seen = run_clipped(max_norm=1e-3, steps=6, clip=clip)
    assert prof.health["per_step"]["grad_norm_pre_clip"] == pytest.approx(returned)
    assert prof.health["per_step"]["clipped"] == [True] * 6


def test_clipping_what_the_optimizer_does_not_use_is_a_mismatch():
    model, opt = setup()
    data = dataset()
    with memprof.track(model, opt, health=True) as prof:
        for i in range(6):
            x, y = batch(data, i)
            loss = torch.nn.functional.mse_loss(model(x), y)
            (loss * 1024).backward()                       # "scaled" gradients
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for p in model.parameters():                   # unscaled after clipping
                p.grad /= 1024
            opt.step()
            opt.zero_grad()
    f = find(prof, "grad_clip_mismatch")
    assert "unscale_" in f.fix


# ------------------------------------------------------------------ schedulers and LR
def test_scheduler_stepped_before_optimizer():
    model, opt = setup(lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(4, 12))
    data = dataset()
    with memprof.track(model, opt, health=True) as prof:
        for i in range(12):
            x, y = batch(data, i)
            torch.nn.functional.mse_loss(model(x), y).backward()
            with pytest.warns(UserWarning) if i == 0 else _nothing():
                sched.step()                               # wrong order (seeds/002)
            opt.step()
            opt.zero_grad()
    f = find(prof, "scheduler_before_optimizer")
    assert f.severity == "warning" and "12 of 12" in f.message
    # the schedule's first value (0.1 / 4) was never applied: step 0 used the second one
    assert prof.health["lr"]["first"] == pytest.approx(0.1 * 2 / 4)
    assert "lr_schedule_per_micro_step" not in kinds(prof)


def test_scheduler_pre_stepped_once_is_info():
    model, opt = setup(lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(4, 12))
    data = dataset()
    with memprof.track(model, opt, health=True) as prof:
        with pytest.warns(UserWarning):
            sched.step()                                   # the seeds/002 "workaround"
        for i in range(8):
            x, y = batch(data, i)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    f = find(prof, "scheduler_stepped_before_first_optimizer_step")
    assert f.severity == "info"
    assert "scheduler_before_optimizer" not in kinds(prof)


def test_scheduler_stepped_per_micro_step():
    model, opt = setup(lr=0.05)
    accum, steps, warmup = 4, 8, 8                          # warmup meant in optimizer steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, 100))
    data = dataset()
    with memprof.track(model, opt, health=True) as prof:
        for i in range(steps * accum):
            x, y = batch(data, i, b=16)
            (torch.nn.functional.mse_loss(model(x), y) / accum).backward()
            with pytest.warns(UserWarning) if i == 0 else _nothing():
                sched.step()                               # per micro-batch (seeds/004)
            if (i + 1) % accum == 0:
                opt.step()
                opt.zero_grad()
    f = find(prof, "lr_schedule_per_micro_step")
    assert f.evidence["scheduler_steps"] == steps * accum
    assert f.evidence["optimizer_steps"] == steps
    assert f.evidence["micro_steps_per_optimizer_step"] == accum
    assert f.evidence["warmup_scheduler_steps"] == warmup - 1
    assert f.evidence["warmup_optimizer_steps"] <= 2       # 8 "steps" of warmup took 2
    assert "warmup lasts 7 scheduler steps = 1.8 optimizer steps" in f.message
    assert "scheduler_before_optimizer" not in kinds(prof)


def test_a_warmup_sized_in_micro_steps_is_shown_in_both_units(capsys):
    """get_linear_schedule_with_warmup(warmup=2 * accum) stepped once per optimizer step (the
    seeds' warmup counted in micro-steps): no rule can tell it from a long warmup meant so,
    but the table gives the warmup in micro-steps too, where the recipe's number shows."""
    model, opt = setup(lr=0.05)
    accum, warmup = 4, 8
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, 100))
    prof = train_with_accumulation(model, opt, sched, 5, accum, b=16)
    assert prof.health["micro_steps_per_optimizer_step"] == accum
    memprof.show(prof, console=Console(width=200))
    out = capsys.readouterr().out
    assert "warmup 4+ optimizer steps = 16+ micro-steps at 4 per optimizer step" in out


def test_lr_changed_by_hand_between_micro_steps():
    model, opt = setup(lr=0.05)
    accum = 4
    data = dataset()
    with memprof.track(model, opt, health=True) as prof:
        for i in range(6 * accum):
            for g in opt.param_groups:
                g["lr"] = 0.05 * min(1.0, (i + 1) / 40)     # counted in micro-batches
            x, y = batch(data, i, b=16)
            (torch.nn.functional.mse_loss(model(x), y) / accum).backward()
            if (i + 1) % accum == 0:
                opt.step()
                opt.zero_grad()
    f = find(prof, "lr_schedule_per_micro_step")
    assert f.evidence["windows_with_lr_change"] >= 5


def test_lr_of_every_param_group():
    model, _ = setup()
    opt = torch.optim.AdamW([{"params": model.fc1.parameters(), "lr": 1e-3},
                             {"params": model.fc2.parameters(), "lr": 1e-2}])
    data = dataset()
    with memprof.track(model, opt, health=True) as prof:
        for i in range(3):
            x, y = batch(data, i)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    assert prof.health["per_step"]["lr"] == [[1e-3, 1e-2]] * 3
    assert prof.health["lr"]["param_groups"] == 2


# ------------------------------------------------------------------ loss
def test_loss_spikes_found_from_backward_roots_and_from_log():
    for use_log in (False, True):
        model, opt = setup(lr=0.02)
        data = dataset()
        with memprof.track(model, opt, health=True) as prof:
            for i in range(24):
                x, y = batch(data, i)
                if i in (12, 18):
                    y = y * 6                             # a bad batch: the loss jumps
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                if use_log:
                    prof.log(loss=loss.item(), tokens=64)
                opt.step()
                opt.zero_grad()
        f = find(prof, "loss_spikes")
        assert {12, 18} <= set(f.evidence["spike_steps"])
        assert f.evidence["rule"]["relative_jump"] == hl.LOSS_REL_JUMP
        assert "rolling median" in f.message and f.fix
        h = prof.health
        assert h["loss_source"] == ("logged: prof.log(loss=...) or a memprof framework "
                                    "callback" if use_log else "root of backward")
        if use_log:
            assert h["logged"]["tokens"]["3"] == 64


def test_a_loss_that_blows_up_is_said_as_a_factor_not_a_40_digit_percentage():
    """A diverging run (an LR range test's end, a bad LR) multiplies its loss by 1e30: the
    spike read "+13069734128198043020948052073563291648%"."""
    model, opt = setup(lr=0.02)
    data = dataset()
    with memprof.track(model, opt, health=True) as prof:
        for i in range(24):
            x, y = batch(data, i)
            loss = torch.nn.functional.mse_loss(model(x), y)
            if i == 18:
                loss = loss * 1e30                  # the loss explodes at one step
            loss.backward()
            prof.log(loss=loss.item())
            opt.zero_grad()                     # (the model itself is left as it was)
            opt.step()
    f = find(prof, "loss_spikes")
    assert 18 in f.evidence["spike_steps"]
    assert re.search(r"\b\d\.\d+e\+\d+x the rolling median", f.message), f.message
    assert not re.search(r"\d{7,}%", f.message), f.message
    # an ordinary jump still reads as a percentage
    assert hl.jump_text(0.5) == "+50%" and hl.jump_text(8.0) == "+800%"
    assert hl.jump_text(1.3e35) == "1.3e+35x the rolling median"
    # a jump of 150x reads as 150x, not "1.5e+02x"
    assert hl.jump_text(149.0) == "150x the rolling median"
    assert hl.jump_text(9.2) == "10x the rolling median"


def test_loss_spike_rule_on_the_seed_series():
    seeds_004 = [169, 141, 169, 242, 212, 182, 186, 161, 189, 181, 181, 172, 218, 186, 175, 198]
    assert [s["index"] for s in hl.loss_spikes(seeds_004)] == [3]
    smooth = [2.0 * math.exp(-k / 20) + 0.5 + 0.01 * ((-1) ** k) for k in range(60)]
    assert hl.loss_spikes(smooth) == []
    # a loss that reached float noise: +767 % of 1.4e-9 is not a spike (the same series
    # scaled up to a real loss still is one)
    noise = [1.3e-9, 1.5e-9, 1.4e-9, 1.2e-9, 1.4e-9, 1.21e-8, 1.3e-9]
    assert hl.loss_spikes(noise) == []
    assert [s["index"] for s in hl.loss_spikes([x * 1e9 for x in noise])] == [5]


def _minibatch_sgd_losses(seed: int, batch_size: int, steps: int = 300):
    """A healthy run whose loss is noisy only because each step sees a few samples: a
    learnable 5-class task, plain SGD (tracked by the caller)."""
    torch.manual_seed(seed)
    x = torch.randn(4000, 20)
    y = (x @ torch.randn(20, 5)).argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def run():
        for _ in range(steps):
            idx = torch.randint(0, 4000, (batch_size,))
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
    return model, opt, run


@pytest.mark.parametrize("seed,batch_size", [(0, 1), (1, 1), (2, 8), (0, 64)])
def test_small_batch_noise_is_no_loss_spike(seed, batch_size):
    # minibatch losses are skewed to the right (a hard batch costs several times the median
    # one): a healthy run at a small batch went above 3.5 robust SD once or twice in 300
    # steps and was told its loss "jumped above its trend" (+1036 % at batch 1)
    model, opt, run = _minibatch_sgd_losses(seed, batch_size)
    with memprof.track(model, opt, health=True) as prof:
        run()
    assert "loss_spikes" not in kinds(prof), [f.message for f in prof.findings]
    assert len(prof.health["per_step"]["loss"]) == 300


def test_a_real_spike_stands_out_of_skewed_noise():
    # the loss series of a healthy batch-1 run, with bad batches at steps 150 and 260 (6x and
    # 10x the loss of the steps before): those are spikes, the noise is not
    model, opt, run = _minibatch_sgd_losses(0, 1)
    with memprof.track(model, opt, health=True) as prof:
        run()
    losses = np.array(prof.health["per_step"]["loss"], dtype=np.float64)
    assert len(hl.loss_spikes(losses, tail_multiple=0)) > 0     # the old rule's false alarms
    assert hl.loss_spikes(losses) == []
    losses[150] = 6 * np.median(losses[140:150])
    losses[260] = 10 * np.median(losses[250:260])
    spikes = hl.loss_spikes(losses)
    assert [s["index"] for s in spikes] == [150, 260]
    assert all(s["tail_multiple"] > hl.LOSS_TAIL_MULTIPLE for s in spikes)

@pytest.mark.parametrize("every", [25, 20, 10])
def test_recurring_spikes_are_found_though_they_are_many(every):
    # a bad batch every `every` steps: spikes that are 4-10 % of the steps set the run's own
    # 99th-percentile jump, which hid them all behind a bar they raised themselves
    rng = np.random.default_rng(0)
    losses = 2 + 0.05 * rng.standard_normal(300)
    losses[every::every] += 3
    found = [s["index"] for s in hl.loss_spikes(losses)]
    assert found == list(range(every, 300, every))

def test_log_rejects_bad_values():
    model, opt = setup()
    with memprof.track(model, opt) as prof:
        with pytest.raises(ValueError, match="loss"):
            prof.log(loss=torch.ones(3))
        with pytest.raises(ValueError, match="loss"):
            prof.log(loss="high")
        prof.log(loss=torch.tensor(2.0))
    assert prof.health["per_step"]["loss"] == [2.0]   # logs work without health=True too


# ------------------------------------------------------------------ non-finite values
@pytest.mark.parametrize("deferred", [False, True], ids=["host", "deferred"])
@pytest.mark.parametrize("clip", [None, "clip_grad_norm_", "clip_grad_norm_ foreach=False",
                                  pytest.param("clip_grads_with_norm_", marks=pytest.mark.skipif(
                                      not hasattr(torch.nn.utils, "get_total_norm"),
                                      reason="torch < 2.6"))])
@pytest.mark.parametrize("bad", ["fc2.weight", "fc2.bias"])
def test_nan_gradient_in_a_named_parameter(bad, clip, deferred, monkeypatch):
    """With clipping too: a NaN norm makes the clip multiply every gradient by NaN, so only
    the gradients before the clip can name the parameter (an H200 run named fc1.weight).
    deferred: the batched device path (CUDA's), exercised on the CPU."""
    if deferred:
        monkeypatch.setattr(health_recorder.HealthRecorder, "_immediate", lambda self, t: False)
        monkeypatch.setattr(health_recorder, "FLUSH_EVERY", 4)
    model, opt = setup()
    data = dataset()
    param = dict(model.named_parameters())[bad]
    state = {"i": 0}
    param.register_hook(lambda g: g * float("nan") if state["i"] == 5 else g)
    with memprof.track(model, opt, health=True) as prof:
        for i in range(8):
            state["i"] = i
            x, y = batch(data, i)
            torch.nn.functional.mse_loss(model(x), y).backward()
            if clip == "clip_grad_norm_":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            elif clip == "clip_grad_norm_ foreach=False":   # one vector_norm per gradient
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
            elif clip == "clip_grads_with_norm_":     # the two halves, called by hand
                params = list(model.parameters())
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
                torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
            opt.step()
            opt.zero_grad()
    f = find(prof, "nonfinite_gradients")
    assert f.severity == "error"
    assert f.evidence["first_step"] == 5 and f.evidence["first_parameter"] == bad
    assert f.holder == bad and f"`{bad}`" in f.message
    # the NaN reached the weights: the loss is non-finite from the next step on
    assert find(prof, "nonfinite_loss").evidence["first_step"] == 6


def test_deferred_reads_give_the_same_numbers(monkeypatch):
    """The batched device path (one host copy per FLUSH_EVERY records), exercised on the CPU."""
    monkeypatch.setattr(health_recorder.HealthRecorder, "_immediate", lambda self, t: False)
    monkeypatch.setattr(health_recorder, "FLUSH_EVERY", 4)
    prof, returned, seen = run_clipped(max_norm=1e-3, steps=9)
    h = prof.health
    assert h["per_step"]["grad_norm_pre_clip"] == pytest.approx(returned)
    assert h["per_step"]["grad_norm"] == pytest.approx(seen, rel=1e-5)
    assert all(v is not None for v in h["per_step"]["loss"])


# ------------------------------------------------------------------ exactness and cleanup
def _train(tracked, health):
    model, opt = setup(lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(3, 10))
    data = dataset()
    torch.manual_seed(3)
    drop = torch.nn.Dropout(0.1)
    losses, grads = [], []
    ctx = memprof.track(model, opt, health=health) if tracked else _nothing()
    with ctx:
        for i in range(12):
            x, y = batch(data, i, b=32)
            loss = torch.nn.functional.mse_loss(model(drop(x)), y) / 2
            loss.backward()
            if i % 2 == 1:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                grads.append([p.grad.clone() for p in model.parameters()])
                opt.step()
                sched.step()
                opt.zero_grad()
            losses.append(loss.detach())
    return losses, grads, [p.detach().clone() for p in model.parameters()]


def test_results_are_bitwise_unchanged():
    base = _train(False, False)
    for health in (False, True):
        other = _train(True, health)
        for a, b in zip(base[0], other[0]):
            assert torch.equal(a, b)
        for ga, gb in zip(base[1], other[1]):
            for a, b in zip(ga, gb):
                assert torch.equal(a, b)
        for a, b in zip(base[2], other[2]):
            assert torch.equal(a, b)


def _originals():
    from torch.nn.utils import clip_grad
    from torch.optim.lr_scheduler import LRScheduler
    out = {"backward": torch.autograd.backward,
           "utils.clip_grad_norm_": torch.nn.utils.clip_grad_norm_,
           "clip_grad.clip_grad_norm_": clip_grad.clip_grad_norm_,
           "clip_grad._clip_grads_with_norm_": getattr(clip_grad, "_clip_grads_with_norm_", None),
           "utils.clip_grads_with_norm_": getattr(torch.nn.utils, "clip_grads_with_norm_", None),
           "clip_grad._get_total_norm": getattr(clip_grad, "_get_total_norm", None),
           "utils.get_total_norm": getattr(torch.nn.utils, "get_total_norm", None),
           # spied on while a total norm is computed
           "_foreach_norm": torch._foreach_norm, "vector_norm": torch.linalg.vector_norm}
    for cls in [LRScheduler] + health_recorder._subclasses(LRScheduler):
        if "step" in cls.__dict__:
            out[cls.__name__] = cls.__dict__["step"]
    return out


def _no_hooks(model):
    from torch.nn.modules import module as modmod
    from torch.optim import optimizer as optmod
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    assert not optmod._global_optimizer_pre_hooks and not optmod._global_optimizer_post_hooks
    assert not modmod._global_forward_pre_hooks and not modmod._global_forward_hooks


def test_everything_removed_on_exit_and_on_exception():
    before = _originals()
    model, opt = setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    data = dataset()
    with memprof.track(model, opt, health=True):
        assert torch.autograd.backward is not before["backward"]
        assert torch.nn.utils.clip_grad_norm_ is not before["utils.clip_grad_norm_"]
        x, y = batch(data, 0)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
    assert _originals() == before
    _no_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with memprof.track(auto_modules=True, health=True):
            torch.nn.functional.mse_loss(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            raise RuntimeError("boom")
    assert _originals() == before
    _no_hooks(model)
    # a clip that raises while the norms are spied on (a NaN with error_if_nonfinite)
    model.fc1.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(RuntimeError, match="non-finite"):
        with memprof.track(model, opt, health=True):
            torch.nn.functional.mse_loss(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
    assert _originals() == before


def test_report_has_a_training_health_table():
    from rich.console import Console
    prof, _, _ = run_clipped(max_norm=1e-3, steps=6)
    con = Console(record=True, width=160)
    prof.report(console=con)
    text = con.export_text()
    assert "Training health (6 optimizer steps)" in text
    assert "grad norm before clipping" in text and "clipped 6 of 6 steps" in text


@pytest.mark.gpu
def test_health_on_a_gpu():
    model, opt = setup()
    model.cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = tuple(t.cuda() for t in dataset())
    param = model.fc2.weight
    state = {"i": 0}
    param.register_hook(lambda g: g * float("nan") if state["i"] == 40 else g)
    with memprof.track(model, opt, health=True) as prof:
        for i in range(45):                       # more than FLUSH_EVERY records
            state["i"] = i
            x, y = batch(data, i)
            torch.nn.functional.mse_loss(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            opt.step()
            opt.zero_grad()
    h = prof.health
    assert all(v is not None for v in h["per_step"]["grad_norm_pre_clip"])
    assert h["per_step"]["grad_norm"][:40] == pytest.approx([1e-3] * 40, rel=1e-3)
    assert find(prof, "nonfinite_gradients").evidence["first_parameter"] == "fc2.weight"


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_norm_catcher_hands_over_only_the_total_it_caught_and_only_its_threads_norms():
    import threading
    from memprof.record.clip_watch import NormCatcher
    catcher = NormCatcher()
    model, _ = setup()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    other = torch.randn(3)
    originals = (torch._foreach_norm, torch.linalg.vector_norm)
    with catcher.catching():
        assert torch.linalg.vector_norm is not originals[1]
        total = torch.nn.utils.clip_grad.clip_grad_norm_(params, 1e9)   # computes the total
        t = threading.Thread(target=lambda: torch.linalg.vector_norm(other))
        t.start()
        t.join()
    assert (torch._foreach_norm, torch.linalg.vector_norm) == originals
    # a clip given another total (its own computation, a stale one) gets nothing
    assert catcher.take(total.clone()) is None
    assert catcher.take(total) is None                  # handed over once, then forgotten
    with catcher.catching():
        total = torch.nn.utils.clip_grad.clip_grad_norm_(params, 1e9)
    ids, norms = catcher.take(total)
    assert ids == [id(p.grad) for p in params]           # the other thread's norm is not in it
    assert torch.equal(norms, torch.stack([p.grad.norm() for p in params]))


def test_an_accelerate_prepared_optimizer_is_watched_through_its_wrapper():
    """`track(model, accelerator.prepare(opt))`: the AcceleratedOptimizer steps the torch
    optimizer without running torch's optimizer hooks itself, so the watched wrapper's hooks
    never ran: no learning-rate or gradient-norm rows, silently."""
    accelerate = pytest.importorskip("accelerate")
    model, opt = setup(lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    assert type(opt).__name__ == "AcceleratedOptimizer"
    data = dataset()
    with memprof.track(model, opt, health=True) as prof:
        for i in range(5):
            x, y = batch(data, i, b=16)
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            opt.step()
            sched.step()
            opt.zero_grad()
    h = prof.health
    assert h["lr"]["peak"] == pytest.approx(0.01) and h["lr"]["warmup_optimizer_steps"] == 2
    assert all(n is not None for n in h["per_step"]["grad_norm"])
    assert len(prof.steps) - prof.partial_last_step == 5


@pytest.mark.parametrize("accum", [1, 2])
def test_a_grad_scaler_loop_shows_the_loss_not_the_scaled_loss(accum):
    """`scaler.scale(loss).backward()`: the table read 1.52e5 for a loss of 2.31, and with a
    large scale the scaled loss overflowed to inf, which made an error finding ("the loss is
    non-finite") out of a run whose loss was finite and whose scaler skipped steps as meant."""
    model, opt = setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    data, true = dataset(), {}
    with memprof.track(model, opt, health=True) as prof:
        for i in range(4 * accum):
            x, y = batch(data, i, b=16)
            loss = torch.nn.functional.mse_loss(model(x), y)
            true.setdefault(i // accum, []).append(loss.item())
            scaler.scale(loss / accum if accum > 1 else loss).backward()
            if (i + 1) % accum == 0:
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
    h = prof.health
    assert h["per_step"]["loss"] == pytest.approx([sum(v) / accum for v in true.values()],
                                                  rel=1e-5)
    assert h["loss_source"].startswith("root of backward before GradScaler's scale")
    assert "nonfinite_loss" not in kinds(prof)


def test_the_non_finite_row_lists_only_what_was_non_finite(capsys):
    """It printed 'gradients at steps [] (first: None)' beside the loss's steps."""
    def step(model, opt, x, y, i):
        loss = torch.nn.functional.mse_loss(model(x), y) * (float("inf") if i else 1.0)
        loss.backward()
        opt.zero_grad()   # never stepped: the weights stay finite
        opt.step()
    prof = tracked_health(3, step)
    memprof.show(prof, console=Console(width=200))
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "non-finite" in line and "loss at" in line)
    assert "loss at steps 1, 2" in row and "[]" not in row and "None" not in row, row


def test_wrappers_without_a_step_method_and_scaled_warmups_read_cleanly():
    """accelerate's DummyOptim has no step: unwrapping it raised AttributeError (the old
    unwrap returned None). A 400-step warmup at 4 micro-steps read '1e+02 optimizer steps'."""
    from memprof.integrations._common import unwrap_optimizer
    from memprof.record.steps import torch_optimizer

    class NoStep:
        def __init__(self):
            self.params = []

    thing = NoStep()
    assert torch_optimizer(thing) is thing and unwrap_optimizer(thing) is None
    model, opt = setup(lr=0.05)
    accum = 4
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(400, 1000))
    data = dataset()
    with memprof.track(model, opt, health=True) as prof:
        for i in range(3 * accum):
            x, y = batch(data, i, b=8)
            (torch.nn.functional.mse_loss(model(x), y) / accum).backward()
            with pytest.warns(UserWarning) if i == 0 else _nothing():
                sched.step()                               # per micro-batch, as in seeds/004
            if (i + 1) % accum == 0:
                opt.step()
                opt.zero_grad()
    message = find(prof, "lr_schedule_per_micro_step").message
    assert "e+" not in message and "optimizer steps" in message


def test_a_divisor_that_requires_grad_is_not_read():
    """`mse / (pred.var() + 1)` in float64: its divisor requires grad; reading it warned into
    the user's output ("Converting a tensor with requires_grad=True to a scalar")."""
    model, opt = setup()
    model.double()
    data = dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with memprof.track(model, opt, health=True) as prof:
            for i in range(3):
                x, y = batch(data, i, b=16)
                pred = model(x.double())
                (torch.nn.functional.mse_loss(pred, y.double()) / (pred.var() + 1)).backward()
                opt.step()
                opt.zero_grad()
    assert prof.health["loss_source"] == "root of backward"


def test_clipping_by_value_is_in_the_table(capsys):
    """clip_grad_value_ left no trace (clip_grad_norm_ gets its rows and findings)."""
    def step(model, opt, x, y, i):
        torch.nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.01)
        opt.step()
        opt.zero_grad()
    prof = tracked_health(4, step)
    assert prof.health["value_clipping"] == {"clip_values": [0.01], "steps": 4}
    memprof.show(prof, console=Console(width=200))
    assert "gradients clamped entry by entry to +-0.01 in 4 of 4 steps" in capsys.readouterr().out


def test_a_loss_logged_every_other_step_says_so_in_the_title():
    """A Trainer with logging_steps=2 logs the loss at half the steps: the table read
    "Training health (3 optimizer steps)" for a run of 6."""
    from rich.console import Console
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt) as prof:
        for step in range(6):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step % 2 == 1:
                prof.log(loss=loss.item())
    con = Console(record=True, width=160)
    prof.report(console=con)
    assert "Training health (3 of 6 optimizer steps logged)" in con.export_text()


def test_work_after_the_last_step_is_no_optimizer_step_in_the_title():
    """An evaluation pass (or an EMA update) after the last optimizer step leaves a partial
    step: the title read "5 of 6 optimizer steps logged" for 5 steps, all logged."""
    from rich.console import Console
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt, health=True) as prof:
        for _ in range(5):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            prof.log(loss=loss.item())
        with torch.no_grad():
            model(torch.randn(8, 4))
    assert prof.partial_last_step
    con = Console(record=True, width=160)
    prof.report(console=con)
    assert "Training health (5 optimizer steps)" in con.export_text()


def test_unclipped_norms_read_the_same_before_clipping_and_as_seen():
    """Nothing clipped (max_norm 100): the two rows read median 5.305 against 4.578 for the
    same four norms (the upper middle element against numpy's median)."""
    import re
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []
    with memprof.track(model, opt, health=True) as prof:
        for i in range(4):
            model(torch.randn(8, 16) * (i + 1)).pow(2).mean().backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)))
            opt.step()
            opt.zero_grad()
    con = Console(record=True, width=200)
    prof.report(console=con)
    rows = re.findall(r"grad norm (?:seen by the optimizer|before clipping)\s*│\s*median "
                      r"([\d.]+), p90 ([\d.]+)", con.export_text())
    assert len(rows) == 2 and rows[0] == rows[1], rows
    assert float(rows[0][0]) == pytest.approx(float(np.median(norms)), rel=1e-3)


class _ItemsNormalised(torch.nn.Module):
    """A loss summed over the items and divided by `num_items_in_batch`, the items of the
    whole optimizer step, as Hugging Face's models do under its Trainer."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 1)

    def forward(self, x, y, num_items_in_batch=None):
        err = (self.lin(x).squeeze(-1) - y).square()
        return err.sum() / num_items_in_batch if num_items_in_batch is not None else err.mean()


def test_a_loss_divided_by_the_items_of_the_whole_step_is_summed_over_its_micro_steps():
    """With 4 micro-steps the health loss read 1/4 of the Trainer's (1.51 against 6.05): the
    mean of micro-steps that each hold a quarter of the step's loss."""
    torch.manual_seed(0)
    model = _ItemsNormalised()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    expected = []
    with memprof.track(model, opt, health=True) as prof:
        for _ in range(3):
            batches = [(torch.randn(6, 8), torch.randn(6)) for _ in range(4)]
            items = torch.tensor(sum(len(y) for _, y in batches))
            total = 0.0
            for x, y in batches:
                loss = model(x, y, num_items_in_batch=items)
                loss.backward()
                total += float(loss.detach())
            expected.append(total)
            opt.step()
            opt.zero_grad()
    assert prof.health["per_step"]["loss"] == pytest.approx(expected, rel=1e-5)
    assert "num_items_in_batch" in prof.health["loss_source"]
