"""EMA copies that memprof never saw as models: never called (only updated in place, as
timm's ModelEmaV2, diffusers' EMAModel and AveragedModel are between evaluations), made
inside a `track(model, opt)` block, updated through `.data`, or kept as a submodule of the
trained model. Each read as "other" memory or as frozen parameters; they are parameters not
trained. Frozen models that are only called stay frozen."""
import copy

import pytest
import torch
from torch import nn

import memprof
from memprof.analyse import summary

pytestmark = pytest.mark.usefixtures("collect_garbage_after")


def nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def net():
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(),
                               torch.nn.Linear(128, 8))


def make_ema(model, how):
    if how == "averaged":
        return torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999))
    return copy.deepcopy(model).requires_grad_(False)


def update(ema, model, how):
    with torch.no_grad():
        if how == "averaged":
            ema.update_parameters(model)
        elif how == "foreach":
            torch._foreach_lerp_(list(ema.parameters()),
                                 [p.detach() for p in model.parameters()], 0.001)
        elif how == "data":
            for e, p in zip(ema.parameters(), model.parameters()):
                e.data.mul_(0.999).add_(p.data, alpha=0.001)
        else:
            for e, p in zip(ema.parameters(), model.parameters()):
                e.mul_(0.999).add_(p.detach(), alpha=0.001)


def steps(model, opt, ema, how, called, n=5):
    for i in range(n):
        x = torch.randn(16, 64)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        update(ema, model, how)
        if called and i % 2:
            with torch.no_grad():
                ema(x)


def run(mode, how, made, called):
    """(split at the peak, parameter bytes, model, ema) of a loop with an EMA beside the
    model: `mode` auto (memprof run) or model (track(model, opt)); `made` before or inside
    the block."""
    torch.manual_seed(0)
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = make_ema(model, how) if made == "before" else None
    if mode == "auto":
        with memprof.track(auto_modules=True) as prof:
            model = net()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            ema = make_ema(model, how)
            steps(model, opt, ema, how, called)
    else:
        with memprof.track(model, opt) as prof:
            if ema is None:
                ema = make_ema(model, how)
            steps(model, opt, ema, how, called)
    return summary(prof)["parameters_at_peak"], prof.breakdown("category")["parameters"], \
        model, ema


CASES = [("auto", how, "inside", False) for how in ("foreach", "mul_add", "averaged")] + \
        [("model", how, made, called) for how in ("foreach", "averaged")
         for made in ("before", "inside") for called in (False, True)]


@pytest.mark.parametrize("mode,how,made,called", CASES)
def test_an_ema_never_called_or_made_in_the_block_is_not_trained(mode, how, made, called):
    split, params, model, ema = run(mode, how, made, called)
    assert split == {"trainable": nbytes(model), "frozen": 0, "not_trained": nbytes(ema)}
    assert params == nbytes(model) + nbytes(ema)


@pytest.mark.parametrize("mode,made,called", [("auto", "inside", True),
                                              ("auto", "inside", False),
                                              ("model", "before", False),
                                              ("model", "inside", True)])
def test_an_ema_updated_through_data_is_not_trained(mode, made, called):
    split, params, model, ema = run(mode, "data", made, called)
    assert split == {"trainable": nbytes(model), "frozen": 0, "not_trained": nbytes(ema)}


class WithEma(torch.nn.Module):
    """A model that keeps the EMA of its backbone as a submodule (self.ema)."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU())
        self.head = torch.nn.Linear(128, 8)
        self.ema = copy.deepcopy(self.backbone).requires_grad_(False)

    def forward(self, x):
        return self.head(self.backbone(x))

    @torch.no_grad()
    def update_ema(self, how):
        pairs = list(zip(self.ema.parameters(), self.backbone.parameters()))
        for e, p in pairs:
            if how == "data":
                e.data.mul_(0.99).add_(p.data, alpha=0.01)
            else:
                e.lerp_(p, 0.01)


@pytest.mark.parametrize("mode", ["auto", "model"])
@pytest.mark.parametrize("how", ["lerp", "data"])
def test_an_ema_kept_inside_the_trained_model_is_not_trained(mode, how):
    torch.manual_seed(0)
    model = WithEma()

    def loop(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(5):
            model(torch.randn(16, 64)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            model.update_ema(how)
        return model

    if mode == "auto":
        with memprof.track(auto_modules=True) as prof:
            model = loop(WithEma())
    else:
        with memprof.track(model) as prof:
            loop(model)
    ema = nbytes(model.ema)
    assert summary(prof)["parameters_at_peak"] == {
        "trainable": nbytes(model) - ema, "frozen": 0, "not_trained": ema}


@pytest.mark.parametrize("mode", ["auto", "model"])
def test_a_frozen_model_beside_that_is_never_called_or_changed_stays_frozen(mode):
    """A frozen model kept beside the trained one and not changed (a reference model made
    in the block, a probe's backbone): its memory is frozen parameters, not "other"."""
    torch.manual_seed(0)
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    kw = {"auto_modules": True} if mode == "auto" else {"model": model, "optimizer": opt}
    with memprof.track(**kw) as prof:
        reference = net().requires_grad_(False)
        if mode == "auto":
            model = net()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(5):
            model(torch.randn(16, 64)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert summary(prof)["parameters_at_peak"] == {
        "trainable": nbytes(model), "frozen": nbytes(reference), "not_trained": 0}


def test_a_frozen_part_of_the_trained_model_only_called_stays_frozen():
    """A frozen backbone inside the trained module (a linear probe, a LoRA base) is frozen,
    also where the optimizer was given only the trainable parameters."""
    torch.manual_seed(0)
    model = WithEma()
    del model.ema
    model.backbone.requires_grad_(False)
    with memprof.track(model) as prof:
        opt = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
        for _ in range(5):
            model(torch.randn(16, 64)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    frozen = nbytes(model.backbone)
    assert summary(prof)["parameters_at_peak"] == {
        "trainable": nbytes(model) - frozen, "frozen": frozen, "not_trained": 0}


def test_the_looks_at_steps_2_4_8_are_memprofs_time():
    """The look for models beside (steps 2, 4, ...) is a pause of memprof's own: recorded
    with its step, for the throughput tables to take out (profile_schema.PAUSES)."""
    torch.manual_seed(0)
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with memprof.track(model, opt) as prof:
        steps(model, opt, make_ema(model, "foreach"), "foreach", False)
    looks = prof.run.records["parameter_looks"]["looks"]
    assert [step for step, _ in looks] == [2, 4]
    assert all(0 <= seconds < 1 for _, seconds in looks)


def test_a_frozen_encoder_made_in_inference_mode_breaks_nothing():
    """An inference tensor has no version counter (reading it raises): the loop's first
    optimizer step died in memprof's hook, and the profile was lost."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 8))
    with torch.inference_mode():
        encoder = nn.Linear(64, 64).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with memprof.track(model, opt) as prof:
        for _ in range(5):
            with torch.no_grad():
                h = encoder(torch.randn(16, 64))
            model(h.clone()).square().mean().backward()
            opt.step()
            opt.zero_grad()
    split = summary(prof)["parameters_at_peak"]
    assert split["trainable"] == sum(p.numel() * 4 for p in model.parameters())
    assert split["not_trained"] == 0 and split["frozen"] == sum(
        p.numel() * 4 for p in encoder.parameters())


class _MergedLoRA(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Linear(256, 256).requires_grad_(False)
        self.A = nn.Parameter(torch.randn(4, 256) * 0.01)
        self.B = nn.Parameter(torch.zeros(256, 4))

    def forward(self, x):
        return self.base(x) + x @ self.A.t() @ self.B.t()

    @torch.no_grad()
    def merge(self, sign: float):
        self.base.weight.add_(self.B @ self.A, alpha=sign)


def test_a_lora_base_merged_and_unmerged_in_place_stays_frozen():
    """The base written in place (weights synced to a generation engine every step, TRL
    GRPO + vLLM) is no EMA: its version counter moves, but it mirrors no trained parameter."""
    torch.manual_seed(0)
    model = _MergedLoRA()
    opt = torch.optim.AdamW([model.A, model.B], lr=1e-2)
    with memprof.track(model, opt) as prof:
        for _ in range(9):
            model(torch.randn(8, 256)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            model.merge(1.0)
            model.merge(-1.0)
    split = summary(prof)["parameters_at_peak"]
    assert split == {"trainable": (4 * 256 * 2) * 4, "frozen": (256 * 256 + 256) * 4,
                     "not_trained": 0}
