"""A block nested in another (a script's own `memprof.track` under `memprof run`, or two
blocks in one script) gets what a block of its own gets: its findings - a nested block was
never analysed, so a smoke test's `assert not memprof.findings(prof)` passed under `memprof
run` whatever the block leaked - and the health it asked for, which the outer block did not
record (`prof.health` was None: a script reading it failed only under memprof run)."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import memprof

pytestmark = pytest.mark.usefixtures("collect_garbage_after")

SCRIPT = textwrap.dedent('''
    import torch, memprof
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    history = []
    with memprof.track(model, opt, health=True) as prof:
        for _ in range(6):
            loss = model(torch.randn(16, 32)).pow(2).mean()
            loss.backward(); opt.step(); opt.zero_grad()
            prof.log(loss=loss.item())
            history.append(loss)          # keeps every step's graph
    found = memprof.findings(prof)
    print("FOUND", [(f.kind, f.holder) for f in found])
    print("LOSSES", sum(x is not None for x in prof.health["per_step"]["loss"]))
    assert any(f.kind == "retained_graph" for f in found)
''')


def _train(model, opt, steps, history=None, prof=None):
    for _ in range(steps):
        loss = model(torch.randn(16, 32)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if prof is not None:
            prof.log(loss=loss.item())
        if history is not None:
            history.append(loss)


def test_a_nested_block_has_its_findings_and_the_health_it_asked_for():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    history = []
    with memprof.track(model, opt) as outer:
        _train(model, opt, 2)
        with memprof.track(model, opt, health=True) as inner:
            _train(model, opt, 6, history, inner)
    holders = [f.holder for f in memprof.findings(inner) if f.kind == "retained_graph"]
    assert holders and holders[0].endswith("<locals>.history"), holders
    assert inner.health is not None
    assert sum(x is not None for x in inner.health["per_step"]["loss"]) == 6
    assert [f.holder for f in memprof.findings(outer) if f.kind == "retained_graph"] == holders


def test_a_scripts_own_block_under_memprof_run_is_analysed(tmp_path):
    script = tmp_path / "smoke.py"
    script.write_text(SCRIPT)
    plain = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    run = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--json", str(script)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    assert run.returncode == 0, run.stderr
    for out in (plain.stdout, run.stderr):   # (the script's output: on stderr under --json)
        assert "FOUND [('retained_graph', 'history')]" in out
        assert "LOSSES 6" in out
    summary = json.loads(run.stdout)
    # memprof run's own profile: the health the script asked for, from its block on
    assert summary["health"] is not None


def test_a_nested_block_reads_its_own_steps_batch_size_and_held_values(monkeypatch):
    """The review's three: the optimizers' turns were read from the outer block's first steps
    (a GAN after 9 steps of another optimizer read per step, at twice its rate); the block's
    own batch_size was dropped; health values still held for a batched device read (as on a
    GPU) were never read for the inner block (all None)."""
    from torch import nn

    from memprof.record import health as health_recorder
    monkeypatch.setattr(health_recorder.HealthRecorder, "_immediate", lambda self, t: False)
    torch.manual_seed(0)
    A = nn.Linear(8, 8)
    oa = torch.optim.SGD(A.parameters(), lr=0.01)
    G, D = nn.Linear(16, 32), nn.Linear(32, 1)
    og, od = torch.optim.SGD(G.parameters(), lr=0.01), torch.optim.SGD(D.parameters(), lr=0.01)
    with memprof.track(auto_modules=True):
        for _ in range(9):   # another optimizer's steps first
            A(torch.randn(4, 8)).sum().backward()
            oa.step()
            oa.zero_grad()
        with memprof.track(auto_modules=True, batch_size=7, health=True) as inner:
            for _ in range(6):
                fake = G(torch.randn(32, 16))
                D(fake.detach()).mean().backward()
                od.step()
                od.zero_grad()
                D(fake).mean().backward()
                og.step()
                og.zero_grad()
    tp = inner.throughput
    assert tp["samples_per_s_per"] == "round of 2 optimizers' steps"
    assert tp["batch_size"] == 7
    norms = [x for x in inner.health["per_step"]["grad_norm"] if x is not None]
    assert len(norms) == 12
