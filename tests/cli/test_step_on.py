"""`memprof run --step-on optimizer|backward|FUNCTION`: what ends a step, on a real script whose
step is a function (two micro-batches per optimizer step), and on a method of a module the
script imports (issue 14)."""
import sys
import textwrap

import pytest

import memprof
from memprof.analyse import throughput
from memprof.cli import main

SCRIPT = '''
"""Six micro-batches, an optimizer step after every second one."""
import sys
import torch

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)


def train_step(i, x, y):
    """One micro-batch."""
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    if i == int(sys.argv[1]):
        raise RuntimeError(f"bad batch {i}")
    if i % 2 == 1:
        opt.step()
        opt.zero_grad()
    return loss.item()


for i in range(6):
    train_step(i, torch.randn(8, 16), torch.randn(8, 4))
print("doc:", train_step.__doc__)
'''


def run(tmp_path, capsys, *options, fail_at=-1, script=SCRIPT):
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(script))
    out = tmp_path / "run.memprof"
    status = main(["run", *options, "-o", str(out), str(path), str(fail_at)])
    captured = capsys.readouterr()
    prof = memprof.load(str(out)) if out.exists() else None
    return status, captured, prof


def steps(prof):
    return len(prof.markers("step"))


def test_default_optimizer_and_a_script_function(tmp_path, capsys):
    status, _, prof = run(tmp_path, capsys)
    assert status == 0 and steps(prof) == 3                 # default: optimizer steps
    status, _, prof = run(tmp_path, capsys, "--step-on", "optimizer")
    assert status == 0 and steps(prof) == 3
    status, out, prof = run(tmp_path, capsys, "--step-on", "train_step")
    assert status == 0 and steps(prof) == 6                 # one per call of train_step
    assert "doc: One micro-batch." in out.out               # the function is still itself
    assert throughput.summarize(prof)["per_step"]["micro_steps"] == [1] * 6


def test_step_on_backward(tmp_path, capsys):
    status, _, prof = run(tmp_path, capsys, "--step-on", "backward")
    assert status == 0 and steps(prof) == 6
    # each step ends right after its backward: the optimizer step lands in the next one
    phases = [m["label"] for m in prof.markers() if m["label"] in ("backward_end", "step")]
    assert phases == ["backward_end", "step"] * 6


def test_a_wrapped_script_function_keeps_pythons_traceback(tmp_path, capsys):
    status, out, prof = run(tmp_path, capsys, "--step-on", "train_step", fail_at=3)
    assert status == 1
    script = tmp_path / "train.py"
    assert f'File "{script}", line 24, in <module>' in out.err
    assert f'File "{script}", line 16, in train_step' in out.err
    assert 'raise RuntimeError(f"bad batch {i}")' in out.err
    assert steps(prof) == 4                                 # calls 0-3: the raising one too


LOOPS = '''
import torch


class Trainer:
    def __init__(self, model):
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(self, x, accumulate):
        for part in x.chunk(accumulate):
            self.model(part).square().mean().backward()
        self.opt.step()
        self.opt.zero_grad()
'''

USES_LOOPS = '''
import torch
from loops import Trainer

trainer = Trainer(torch.nn.Linear(8, 8))
for _ in range(4):
    trainer.step(torch.randn(8, 8), accumulate=2)
'''


def test_a_method_of_an_imported_module(tmp_path, capsys, monkeypatch):
    (tmp_path / "loops.py").write_text(LOOPS)
    monkeypatch.delitem(sys.modules, "loops", raising=False)
    status, _, prof = run(tmp_path, capsys, "--step-on", "loops:Trainer.step",
                          script=USES_LOOPS)
    assert status == 0 and steps(prof) == 4
    assert throughput.summarize(prof)["per_step"]["micro_steps"] == [2] * 4
    loops = sys.modules.pop("loops")
    assert not hasattr(loops.Trainer.__dict__["step"], "__wrapped__")   # restored after


@pytest.mark.parametrize("spec, says", [
    ("nope", "--step-on 'nope': no function of that name in"),
    ("no_such_module:f", "--step-on 'no_such_module:f': cannot import 'no_such_module'"),
    ("torch:float32", "--step-on 'torch:float32': 'float32' in torch is not a function"),
])
def test_a_bad_step_on_is_one_line_before_the_script_runs(tmp_path, capsys, spec, says):
    status, out, prof = run(tmp_path, capsys, "--step-on", spec)
    assert status == 2 and prof is None
    assert says in out.err and len(out.err.strip().splitlines()) == 1
    assert "doc:" not in out.out


def test_manual_says_what_it_means_here_and_auto_is_the_default(tmp_path, capsys):
    """track(step_on=)'s two other values: 'manual' was looked up as a function of the script
    ("no function of that name"), 'auto' too."""
    status, out, prof = run(tmp_path, capsys, "--step-on", "manual")
    assert status == 2 and prof is None and len(out.err.strip().splitlines()) == 1
    assert "'manual' is track(step_on=)'s value for steps that prof.step() ends" in out.err
    status, _, prof = run(tmp_path, capsys, "--step-on", "auto")
    assert status == 0 and steps(prof) == 3                 # as without --step-on


def test_a_generator_is_refused(tmp_path, capsys):
    script = SCRIPT + "\ndef batches():\n    yield 1\n"
    status, out, _ = run(tmp_path, capsys, "--step-on", "batches", script=script)
    assert status == 2 and "is a generator" in out.err


ASYNC_SCRIPT = '''
import asyncio, sys
import torch
sys.path.insert(0, sys.path[0])
import async_steps

async def main():
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        pending = async_steps.train_step(model, opt)   # created: the step has not run yet
        await asyncio.sleep(0)
        await pending

asyncio.run(main())
'''

ASYNC_STEPS = '''
import asyncio
import torch

async def train_step(model, opt):
    """Two micro-batches: the step ends when the coroutine does."""
    for _ in range(2):
        model(torch.randn(8, 16)).square().mean().backward()
        await asyncio.sleep(0)
    opt.step()
    opt.zero_grad()
'''


def test_an_async_module_function_ends_its_step_when_the_coroutine_does(tmp_path, capsys):
    """`--step-on MODULE:NAME` of an `async def`: the step ended when the coroutine was made
    (before its work), so each step's markers fell before its own allocations."""
    (tmp_path / "async_steps.py").write_text(ASYNC_STEPS)
    status, _, prof = run(tmp_path, capsys, "--step-on", "async_steps:train_step",
                          script=ASYNC_SCRIPT)
    assert status == 0 and steps(prof) == 4
    # every step holds its own two backward passes and optimizer step
    assert throughput.summarize(prof)["per_step"]["micro_steps"] == [2] * 4
