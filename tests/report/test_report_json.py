"""`memprof report run.memprof --json`: the summary says what the terminal report marks
"(partial)", the work after the last step boundary."""
import json

import pytest
import torch

import memprof
from rich.console import Console
from memprof.cli import main


def _saved_run(path, evaluate_after: bool) -> str:
    """3 SGD steps of a small MLP; with evaluate_after, an evaluation pass follows the last
    optimizer step inside the tracked block (a trailing partial step)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt, path=str(path)) as prof:
        for _ in range(3):
            model(torch.randn(16, 32)).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if evaluate_after:
            with torch.no_grad():
                model(torch.randn(256, 32)).sum()
    return prof.saved


def _json_report(path, capsys) -> dict:
    capsys.readouterr()
    assert main(["report", path, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("evaluate_after", [True, False])
def test_json_says_whether_the_last_step_is_partial(tmp_path, capsys, evaluate_after):
    path = _saved_run(tmp_path / "run.memprof", evaluate_after)
    data = _json_report(path, capsys)
    assert data["partial_last_step"] is evaluate_after
    assert data["partial_last_step"] == memprof.load(path).partial_last_step   # as the terminal
    steps = data["steps"]
    assert len(steps) == 3 + evaluate_after
    assert [s["partial"] for s in steps] == [False] * 3 + [True] * evaluate_after


@pytest.mark.parametrize("evaluate_after", [True, False])
def test_terminal_header_counts_finished_steps(tmp_path, capsys, evaluate_after):
    """The header said `steps 4` for 3 optimizer steps and an evaluation pass."""
    path = _saved_run(tmp_path / "run.memprof", evaluate_after)
    capsys.readouterr()
    assert main(["report", path]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ("steps 3 + partial " if evaluate_after else "steps 3 ") in out


def test_a_run_cut_short_by_the_capacity_says_what_its_numbers_cover(tmp_path, capsys):
    """50 steps into a log of 2000 events: the report read as a complete 12-step run (the
    HTML did not even mention the dropped events). Terminal, HTML and JSON now say it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = str(tmp_path / "cut.memprof")
    with pytest.warns(RuntimeWarning, match="dropped"):
        with memprof.track(model, opt, capacity=300, path=path) as prof:
            for _ in range(30):
                model(torch.randn(8, 32)).sum().backward()
                opt.step()
                opt.zero_grad()
    cover = len(prof.steps) - 1
    assert 0 < cover < 29
    expected = (f"the peak, steps and findings cover steps 0-{cover} of 30 only; "
                "track(capacity=...) or memprof run --capacity records more")
    assert prof.truncated.endswith(expected) and "capacity 300 events" in prof.truncated
    assert _json_report(path, capsys)["truncated"] == prof.truncated
    assert main(["report", path, "--export", str(tmp_path / "cut.html")]) == 0
    assert expected in (tmp_path / "cut.html").read_text()
    capsys.readouterr()
    memprof.show(prof, console=Console(width=300))
    assert expected in capsys.readouterr().out
