"""An EMA copy of the model (copy.deepcopy + requires_grad_(False), or torch's AveragedModel)
updated after each optimizer step is a model of its own that no optimizer trains: under
auto_modules (memprof run) its parameters read as "frozen" (a deepcopy: as if part of the
model were frozen) or as "trainable" (AveragedModel keeps requires_grad: the trainable bytes
doubled). They are now the parameters' third part, not trained."""
import copy

import pytest
import torch
from rich.console import Console

import memprof
from memprof.analyse import summary

pytestmark = pytest.mark.usefixtures("collect_garbage_after")


def nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def net():
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(),
                               torch.nn.Linear(128, 128), torch.nn.GELU(),
                               torch.nn.Linear(128, 8))


def update(ema, model, how):
    with torch.no_grad():
        if how == "averaged":
            ema.update_parameters(model)
        elif how == "foreach":
            torch._foreach_lerp_(list(ema.parameters()),
                                 [p.detach() for p in model.parameters()], 0.001)
        else:
            for e, p in zip(ema.parameters(), model.parameters()):
                e.mul_(0.999).add_(p.detach(), alpha=0.001)


def train_with_ema(how, freeze_first=False, steps=4):
    """Under track(auto_modules=True), as memprof run records: the model, its AdamW, the EMA
    copy updated after each step and evaluated every other step; (profile, model, ema)."""
    torch.manual_seed(0)
    with memprof.track(auto_modules=True, health=True) as prof:
        model = net()
        if freeze_first:
            model[0].requires_grad_(False)
        if how == "averaged":
            ema = torch.optim.swa_utils.AveragedModel(
                model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999))
        else:
            ema = copy.deepcopy(model)
            ema.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for i in range(steps):
            x = torch.randn(16, 64)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            update(ema, model, how)
            if i % 2:
                with torch.no_grad():
                    ema(x)
    return prof, model, ema


def rows(prof) -> dict[str, str]:
    con = Console(record=True, width=200)
    prof.report(console=con)
    out = {}
    for line in con.export_text().splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 3 and cells[0]:
            out.setdefault(cells[0], cells[1])
    return out


@pytest.mark.parametrize("how", ["averaged", "foreach", "mul_add"])
def test_an_ema_copy_is_neither_trainable_nor_frozen(how, tmp_path):
    prof, model, ema = train_with_ema(how)
    split = summary(prof)["parameters_at_peak"]
    assert split == {"trainable": nbytes(model), "frozen": 0, "not_trained": nbytes(ema)}
    assert prof.breakdown("category")["parameters"] == nbytes(model) + nbytes(ema)
    shown = rows(prof)
    assert "frozen" not in shown
    assert any(k.startswith("not trained") for k in shown), shown
    assert not memprof.findings(prof), prof.findings
    prof.export(str(tmp_path / "r.html"))
    page = (tmp_path / "r.html").read_text()
    assert f'data-parameters="not_trained" data-bytes="{nbytes(ema)}"' in page
    assert 'data-parameters="frozen"' not in page
    assert summary(memprof.load(prof.save(str(tmp_path / "r.memprof"))))[
        "parameters_at_peak"] == split


def test_a_frozen_part_of_the_model_stays_frozen_beside_its_ema():
    prof, model, ema = train_with_ema("foreach", freeze_first=True)
    frozen = sum(p.numel() * 4 for p in model[0].parameters())
    assert summary(prof)["parameters_at_peak"] == {
        "trainable": nbytes(model) - frozen, "frozen": frozen, "not_trained": nbytes(ema)}


def test_models_without_an_optimizer_keep_requires_grad_as_the_rule():
    """A hand-written update (no torch.optim): nothing tells what trains but requires_grad."""
    torch.manual_seed(0)
    with memprof.track(auto_modules=True) as prof:
        model = net()
        ema = copy.deepcopy(model).requires_grad_(False)
        for _ in range(3):
            model(torch.randn(16, 64)).square().mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
                    p.grad = None
            update(ema, model, "foreach")
            with torch.no_grad():
                ema(torch.randn(2, 64))
    assert summary(prof)["parameters_at_peak"] == {
        "trainable": nbytes(model), "frozen": nbytes(ema), "not_trained": 0}


def gan_steps(g, d, opt_g, opt_d, steps=3):
    for _ in range(steps):
        d(torch.randn(4, 64)).square().mean().backward()
        opt_d.step()
        opt_d.zero_grad()
        g(torch.randn(4, 64)).square().mean().backward()
        opt_g.step()
        opt_g.zero_grad()


def test_two_models_each_with_its_own_optimizer_both_train():
    """A GAN under auto_modules: the generator and the discriminator are roots each trained by
    its own optimizer."""
    torch.manual_seed(0)
    with memprof.track(auto_modules=True) as prof:
        g, d = net(), net()
        opt_g = torch.optim.Adam(g.parameters(), lr=1e-4)
        opt_d = torch.optim.Adam(d.parameters(), lr=1e-4)
        gan_steps(g, d, opt_g, opt_d)
    assert summary(prof)["parameters_at_peak"] == {
        "trainable": nbytes(g) + nbytes(d), "frozen": 0, "not_trained": 0}


def test_one_optimizer_given_leaves_the_other_models_to_requires_grad():
    """track(optimizer=opt_d): opt_g is not watched, so nothing says g does not train."""
    torch.manual_seed(0)
    d = net()
    opt_d = torch.optim.Adam(d.parameters(), lr=1e-4)
    with memprof.track(auto_modules=True, optimizer=opt_d) as prof:
        g = net()
        opt_g = torch.optim.Adam(g.parameters(), lr=1e-4)
        gan_steps(g, d, opt_g, opt_d)
    assert summary(prof)["parameters_at_peak"] == {
        "trainable": nbytes(g) + nbytes(d), "frozen": 0, "not_trained": 0}


@pytest.mark.parametrize("called", ["every_step", "once"])
def test_a_frozen_model_beside_the_trained_one_stays_frozen(called):
    """A frozen model called beside the one that trains (a diffusion run's VAE or text
    encoder, a perceptual loss's network, a linear probe's backbone) is frozen, as its
    requires_grad says: only a model changed in place while no optimizer trains it (an EMA)
    is "not trained"."""
    torch.manual_seed(0)
    with memprof.track(auto_modules=True) as prof:
        model, encoder = net(), net().requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for i in range(4):
            x = torch.randn(16, 64)
            if called == "every_step" or i == 0:
                with torch.no_grad():
                    x = torch.nn.functional.pad(encoder(x), (0, 56))
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert summary(prof)["parameters_at_peak"] == {
        "trainable": nbytes(model), "frozen": nbytes(encoder), "not_trained": 0}
