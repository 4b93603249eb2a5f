"""`memprof report run.memprof --json`: the summary says what the terminal report marks
"(partial)", the work after the last step boundary."""
import json

import pytest
import torch

import memprof
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
