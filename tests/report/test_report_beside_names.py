"""Models kept beside the trained one (an EMA never called, found in the loop's frame) read
"not trained" with no owner: their bytes were "outside modules" in the module tables. Their
modules are named by the path the loop's frame gives them (`ema_model.module.0`)."""
import copy

import pytest
import torch
from rich.console import Console

import memprof
from memprof.analyse import summary
from memprof.report.html_data import module_nodes

pytestmark = pytest.mark.usefixtures("collect_garbage_after")


def net():
    return torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.GELU(),
                               torch.nn.Linear(512, 64))


def nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class Trainer:
    """Holds its EMA as an attribute: the block's frame has it as `trainer.ema`."""

    def __init__(self, model):
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.ema = copy.deepcopy(model).requires_grad_(False)

    def fit(self, n=5):
        for _ in range(n):
            self.model(torch.randn(16, 64)).square().mean().backward()
            self.opt.step()
            self.opt.zero_grad()
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters()):
                    e.lerp_(p, 0.01)


def loop(model, opt, ema_model, n=5):
    for _ in range(n):
        model(torch.randn(16, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema_model.update_parameters(model)


def averaged(model):
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.99))


@pytest.mark.parametrize("mode", ["auto", "model"])
def test_an_ema_beside_the_model_is_named_by_its_path_in_the_loop(mode):
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if mode == "auto":
        with memprof.track(auto_modules=True) as prof:
            model = net()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            ema_model = averaged(model)
            loop(model, opt, ema_model)
    else:
        ema_model = averaged(model)
        with memprof.track(model, opt) as prof:
            loop(model, opt, ema_model)
    by_module = prof.breakdown("module")
    for i in (0, 2):
        assert by_module.get(f"ema_model.module.{i}") == nbytes(model[i])
    assert summary(prof)["parameters_at_peak"]["not_trained"] == nbytes(model)
    # the model's own names keep theirs (no label added for the copy beside it)
    assert by_module.get("Sequential.0", 0) >= nbytes(model[0])


def test_an_ema_held_by_a_trainer_is_named_after_its_attribute():
    trainer = Trainer(net())
    with memprof.track(trainer.model, trainer.opt) as prof:
        trainer.fit()
    by_module = prof.breakdown("module")
    assert by_module.get("trainer.ema.0") == nbytes(trainer.model[0])
    assert by_module.get("trainer.ema.2") == nbytes(trainer.model[2])


def test_the_reports_show_the_names():
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema_model = averaged(model)
    with memprof.track(model, opt) as prof:
        loop(model, opt, ema_model)
    con = Console(record=True, width=200)
    prof.report(console=con)
    assert "ema_model.module.0" in con.export_text()
    assert summary(prof)["by_module_at_peak"]["ema_model.module.0"] == nbytes(model[0])
    prof.export("run.html")
    with open("run.html", encoding="utf-8") as f:
        assert "ema_model.module.0" in f.read()


def test_the_icicle_shows_a_model_beside_next_to_the_model_not_inside_it():
    """The HTML's module tree: the copy beside is a child of all memory, as the model is;
    under the model (whose name is the empty path) its bytes added to the model's."""
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema_model = averaged(model)
    with memprof.track(model, opt) as prof:
        loop(model, opt, ema_model)
    nodes = module_nodes(prof.profile)
    top = {nodes[i]["name"]: nodes[i] for i in nodes[0]["children"]}
    assert "ema_model" in top and "Sequential" in top
    assert top["ema_model"]["total"] >= nbytes(ema_model)
    assert sum(n["total"] for n in top.values()) == nodes[0]["total"]
    assert prof.profile.meta["beside_modules"] == ["ema_model"]


def test_a_model_named_beside_then_called_keeps_its_names():
    """memprof run: an EMA found beside at step 2 and evaluated only after step 4 becomes a
    root under the name it had (`ema.0`), not a second one (`ema_2.0`)."""
    with memprof.track(auto_modules=True) as prof:
        model = net()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ema = copy.deepcopy(model).requires_grad_(False)
        for i in range(6):
            model(torch.randn(16, 64)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 0.01)
                if i == 4:
                    ema(torch.randn(16, 64))
    names = prof.profile.modules
    assert "ema.0" in names and not any(n.startswith("ema_2") for n in names)
    by_module = prof.breakdown("module", at="end")
    assert by_module.get("ema.0") == nbytes(ema[0])
    assert summary(prof)["parameters_at_peak"]["not_trained"] == nbytes(ema)
