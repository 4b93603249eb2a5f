"""The script's atexit handlers run in the script's world, as under python: its classes pickle
from `__main__` and sys.argv / sys.path are the script's (they were memprof's again by then: a
checkpoint saved at exit failed with "attribute lookup Ckpt on __main__ failed")."""
import os
import subprocess
import sys
import textwrap

SCRIPT = '''
import atexit
import os
import sys
import torch

class Ckpt:
    def __init__(self, state, step):
        self.state, self.step = state, step

HERE = os.path.dirname(os.path.abspath(__file__))   # (python deletes __file__ before atexit)
model = torch.nn.Linear(8, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)

def save_at_exit():
    torch.save(Ckpt(model.state_dict(), 3), "last.pt")
    back = torch.load("last.pt", weights_only=False)
    print("at exit", type(back).__name__, back.step, sys.argv[1:],
          sys.path[0] == HERE, flush=True)

atexit.register(save_at_exit)
for _ in range(3):
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
print("trained")
'''


def test_atexit_handlers_pickle_the_scripts_classes_and_read_its_argv(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    python = subprocess.run([sys.executable, str(script), "--epochs", "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    os.remove(tmp_path / "last.pt")
    memprof = subprocess.run([sys.executable, "-m", "memprof.cli", "run", str(script),
                              "--epochs", "1"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    expected = "at exit Ckpt 3 ['--epochs', '1'] True"
    assert python.returncode == 0 and python.stdout.splitlines() == ["trained", expected]
    assert memprof.returncode == 0, memprof.stderr
    assert "Exception ignored in atexit" not in memprof.stderr, memprof.stderr
    lines = memprof.stdout.splitlines()
    assert lines[0] == "trained" and lines[-1] == expected   # after the report, as python's last
    assert (tmp_path / "train.memprof").exists() and (tmp_path / "last.pt").exists()


FINALIZED = '''
import torch

class Writer:
    """A log writer that flushes when the interpreter finalizes the script's globals."""
    def __init__(self):
        self.rows = []

    def __del__(self):
        print("writer flushed", len(self.rows), torch.__name__, flush=True)

writer = Writer()
model = torch.nn.Linear(8, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    writer.rows.append(1)
'''


def test_the_scripts_globals_are_finalized_as_under_python(tmp_path):
    """memprof's session, kept by torch after the block, held the script's frame: its globals
    were never finalized (a writer's __del__ never ran), then cleared to None before it."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(FINALIZED))
    python = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    memprof = subprocess.run([sys.executable, "-m", "memprof.cli", "run", str(script)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert python.stdout == "writer flushed 3 torch\n", python.stderr
    assert memprof.returncode == 0, memprof.stderr
    assert memprof.stdout.splitlines()[-1] == "writer flushed 3 torch", memprof.stderr
    assert "Exception ignored" not in memprof.stderr
