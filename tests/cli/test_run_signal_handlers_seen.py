"""To the script, memprof's SIGTERM/SIGINT handlers are the defaults they stand in for: a
script's handler that chains to the previous one (a checkpoint, then `prev(signum, frame)` if
callable, as SLURM requeue scripts and frameworks do) ended the run by SIGTERM (143) where
python's ended with the script's own status; a handler put back after a critical section
still saves the profile at the signal."""
import os
import signal
import subprocess
import sys
import textwrap

import memprof

SCRIPT = '''
import os
import signal
import sys
import threading
import torch

mode = sys.argv[1]
prev = signal.getsignal(signal.SIGTERM)
print("defaults", prev == signal.SIG_DFL,
      signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)

def on_term(signum, frame):
    print("checkpoint saved", flush=True)
    if callable(prev):
        prev(signum, frame)
    sys.exit(0)

old = signal.signal(signal.SIGTERM, on_term)
if mode == "put back":   # a critical section over: the handler there before is back
    print("old is the default", old == signal.SIG_DFL, flush=True)
    signal.signal(signal.SIGTERM, old)
model = torch.nn.Linear(8, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
os.kill(os.getpid(), signal.SIGTERM)
while True:   # (the signal's handler runs at the next bytecode)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
'''


def _both(tmp_path, mode):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    python = subprocess.run([sys.executable, str(script), mode], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    memprof_run = subprocess.run([sys.executable, "-m", "memprof.cli", "run", str(script),
                                  mode], cwd=tmp_path, capture_output=True, text=True,
                                 timeout=300)
    return python, memprof_run


def test_a_handler_that_chains_to_the_previous_one_ends_as_under_python(tmp_path):
    python, r = _both(tmp_path, "chain")
    assert python.returncode == 0 and python.stdout == "defaults True True\ncheckpoint saved\n"
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(python.stdout), r.stdout
    assert "stopped by SIGTERM" not in r.stderr
    assert len(memprof.load(str(tmp_path / "train.memprof")).steps) >= 3


def test_the_default_put_back_still_saves_the_profile_at_the_signal(tmp_path):
    python, r = _both(tmp_path, "put back")
    assert python.returncode == -signal.SIGTERM
    assert python.stdout == "defaults True True\nold is the default True\n"
    assert r.returncode == -signal.SIGTERM, r.stderr
    assert r.stdout.startswith(python.stdout), r.stdout
    assert "stopped by SIGTERM" in r.stderr and os.path.exists(tmp_path / "train.memprof")
