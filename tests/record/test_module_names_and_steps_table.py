"""Module names keep their index path (`layers.3`), also for a bare nn.Sequential root and for a
submodule called on its own before its model; the steps table marks elided rows and the last,
partial step (issue 14)."""
import re

import torch
from rich.console import Console

import memprof


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                          torch.nn.Linear(16, 16), torch.nn.Tanh())
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.layers(x))


def train(model, steps, track, first=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with track as prof:
        if first is not None:
            first(torch.randn(4, 8))
        for _ in range(steps):
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    return prof


def activation_modules(prof):
    return set(prof.activations_by_module())


def test_children_of_a_nested_sequential_keep_their_index_path():
    for auto in (False, True):
        torch.manual_seed(0)
        model = Net()
        prof = train(model, 2, memprof.track(auto_modules=True) if auto else memprof.track(model))
        assert prof.modules == ["", "layers", "layers.0", "layers.1", "layers.2", "layers.3",
                                "head"]
        assert {"layers.1", "layers.3", "head"} <= activation_modules(prof)


def test_a_bare_sequential_root_names_children_by_index_under_its_class():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 2)))
    prof = train(model, 2, memprof.track(auto_modules=True))
    assert prof.modules == ["", "0", "1", "2", "2.0", "2.1"]     # the index paths, as recorded
    assert prof.module_name(0) == "Sequential"
    assert prof.module_name(prof.modules.index("2.1")) == "Sequential.2.1"   # never "module 1"
    assert {"Sequential.1", "Sequential.2.0", "Sequential.2.1"} <= activation_modules(prof)


def test_a_submodule_called_alone_first_takes_its_path_in_the_model():
    torch.manual_seed(0)
    model = Net()
    prof = train(model, 2, memprof.track(auto_modules=True), first=model.layers)
    assert sorted(prof.modules) == ["", "head", "layers", "layers.0", "layers.1", "layers.2",
                                    "layers.3"]
    assert prof.meta["model_class"] == "Net"
    # the lone call's activations and the model's land on the same, renamed modules
    assert {"layers.1", "layers.3", "head"} <= activation_modules(prof)


def render(prof, top):
    console = Console(record=True, width=200)
    prof.report(console=console, top=top)
    return console.export_text()


def test_steps_table_marks_elided_rows_and_the_partial_last_step(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model) as prof:
        for _ in range(9):
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():                    # a test pass after training: no optimizer step
            model(torch.randn(64, 8))
    assert len(prof.steps) == 10 and len(prof.markers("step")) == 9
    text = render(prof, top=2)
    assert "... 6 steps not shown ..." in text
    assert "9 (partial)" in text and "partial: work after the last step boundary" in text
    shown = {int(m) for m in re.findall(r"^│\s+(\d+)(?: \(partial\))? │", text, re.M)}
    assert shown == {0, 1, 8, 9}
    prof.export(str(tmp_path / "r.html"))
    assert "<td>9 (partial)</td>" in (tmp_path / "r.html").read_text()

    with memprof.track(model) as whole:          # every step finished: nothing is partial
        for _ in range(3):
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
    text = render(whole, top=2)
    assert "partial" not in text and "not shown" not in text
