"""A block nested in another (a script's own `memprof.track` under `memprof run`) numbers its
steps from its own start, as the same block run by python does: its health and `prof.log`
steps, its events' steps (the peak "at step 3" of a block that ran 4) read the outer block's
numbers - its profile's first step was the outer run's step k. The outer keeps its own."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import memprof

pytestmark = pytest.mark.usefixtures("collect_garbage_after")

SCRIPT = textwrap.dedent('''
    import json, torch, memprof
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    def train(n, prof=None):
        for _ in range(n):
            loss = model(torch.randn(8, 16)).pow(2).mean()
            loss.backward(); opt.step(); opt.zero_grad()
            if prof is not None:
                prof.log(loss=loss.item())
    train(3)
    with memprof.track(model, opt, health=True) as prof:
        train(4, prof)
    print("STEPS", json.dumps({
        "health": prof.health["per_step"]["step"],
        "logs": sorted({s for s, _, _ in prof.run.records["logs"]}),
        "events": sorted({int(s) for s in prof.memory["step"]}),
        "peak": prof.peak_event["step"]}))
''')


def _train(model, opt, steps, prof=None):
    for _ in range(steps):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if prof is not None:
            prof.log(loss=loss.item())


def _steps(prof) -> dict:
    return {"health": prof.health["per_step"]["step"],
            "logs": sorted({s for s, _, _ in prof.run.records["logs"]}),
            "events": sorted({int(s) for s in prof.memory["step"]}),
            "peak": prof.peak_event["step"]}


def test_a_nested_block_numbers_its_steps_from_its_start():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt, health=True) as outer:
        _train(model, opt, 3, outer)
        with memprof.track(model, opt, health=True) as inner:
            _train(model, opt, 4, inner)
    own = _steps(inner)
    assert own["health"] == own["logs"] == [0, 1, 2, 3], own
    assert set(own["events"]) <= {0, 1, 2, 3, 4} and own["peak"] <= 3, own
    assert [s.index for s in inner.steps] == [0, 1, 2, 3]
    whole = _steps(outer)   # the outer keeps its numbering
    assert whole["health"] == whole["logs"] == list(range(7)), whole
    assert len(outer.steps) == 7


def test_a_scripts_block_under_memprof_run_numbers_its_steps_as_python(tmp_path):
    (tmp_path / "nested.py").write_text(SCRIPT)
    outs = []
    for cmd in ([sys.executable, "nested.py"],
                [sys.executable, "-m", "memprof.cli", "run", "--health", "-o", "r.memprof",
                 "nested.py"]):
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        outs.append(next(json.loads(line[6:]) for line in r.stdout.splitlines()
                         if line.startswith("STEPS ")))
    assert outs[0] == outs[1], outs
    assert outs[0]["health"] == [0, 1, 2, 3]
