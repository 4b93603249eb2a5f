"""A block given no model says what its figures leave out: `with memprof.track():` around a
loop over a model built before it read "parameters 0 B" and "module <outside modules>" at the
peak, in every report, with no word why."""
import html

import torch
from rich.console import Console

import memprof
from memprof.analyse import summary


def run(model_given: bool, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters())
    with memprof.track(model if model_given else None, **options) as prof:
        for _ in range(2):
            x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    con = Console(record=True, width=300)
    prof.report(console=con)
    return prof, " ".join(con.export_text().split())


def test_no_model_says_so_in_every_report(tmp_path):
    prof, text = run(model_given=False)
    assert prof.breakdown("category")["parameters"] == 0       # what needs the words
    said = ("No model was given to track(): memory is not attributed to modules and forward "
            "passes are not seen, and the parameters, made before the block, are not "
            "counted. Pass it: track(model).")
    assert said in text
    assert summary(prof)["not_counted"] == said
    page = (tmp_path / "r.html")
    prof.export(str(page))
    assert html.escape(said) in page.read_text()
    saved = memprof.load(prof.save(str(tmp_path / "r.memprof")))
    assert summary(saved)["not_counted"] == said


def test_modules_named_as_they_ran_say_only_what_is_missing():
    prof, text = run(model_given=False, auto_modules=True)
    assert "The parameters were made before the block and are not counted; track(model) " \
        "counts them." in text
    assert "No model was given" not in text


def test_a_model_given_adds_no_words():
    prof, text = run(model_given=True)
    assert prof.breakdown("category")["parameters"] > 0
    assert "not counted" not in text and summary(prof)["not_counted"] is None
