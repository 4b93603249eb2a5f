"""A script that replaces its process with os.execv (restarting itself, handing over to another
program) leaves its profile and says so in one line: the block was never left, and the profile
was lost without a word. A path that cannot run raises as under python, the run still
recorded."""
import subprocess
import sys
import textwrap

import memprof

SCRIPT = '''
import os
import sys
import torch

if "--restarted" in sys.argv:
    print("restarted", sys.argv[1:], flush=True)
    sys.exit(0)
model = torch.nn.Linear(8, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)

def train(steps):
    for _ in range(steps):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

train(3)
try:
    os.execv("/nonexistent/python", ["python"])
except FileNotFoundError:
    print("no such program", flush=True)
train(2)
os.execv(sys.executable, [sys.executable] + sys.argv + ["--restarted"])
'''


def _run(tmp_path, *command):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    return subprocess.run([*command, str(script), "--lr", "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_a_script_that_restarts_itself_leaves_its_profile_and_says_so(tmp_path):
    python = _run(tmp_path, sys.executable)
    assert python.returncode == 0, python.stderr
    assert python.stdout == "no such program\nrestarted ['--lr', '1', '--restarted']\n"
    r = _run(tmp_path, sys.executable, "-m", "memprof.cli", "run")
    assert r.returncode == 0, r.stderr
    assert r.stdout == python.stdout   # the restarted program's output, no report
    said = [line for line in r.stderr.splitlines() if line.startswith("memprof:")]
    assert len(said) == 1 and "os.execv(" in said[0] and "train.memprof" in said[0] and \
        "runs without memprof" in said[0], r.stderr
    assert len(memprof.load(str(tmp_path / "train.memprof")).steps) == 5
