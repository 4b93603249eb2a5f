"""The script's own SIGTERM / SIGINT handlers stay installed through its atexit handlers, as
under python (a slow checkpoint save at exit): under memprof run they were the defaults again
by then, and a SIGTERM there killed the process mid-save (a SIGINT raised KeyboardInterrupt
in it)."""
import subprocess
import sys
import textwrap

import memprof

SLOW_SAVE = '''
import atexit, os, signal, time
import torch

def on_signal(signum, frame):
    print("script's handler", signal.Signals(signum).name, flush=True)

signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)

def save_checkpoint():
    print("installed", signal.getsignal(signal.SIGTERM) is on_signal,
          signal.getsignal(signal.SIGINT) is on_signal, flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):   # the job's time is up while it saves
        os.kill(os.getpid(), sig)
        time.sleep(0.05)
    print("checkpoint saved", flush=True)

atexit.register(save_checkpoint)
model = torch.nn.Linear(8, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
print("trained", flush=True)
'''

EXPECTED = ["trained", "installed True True", "script's handler SIGTERM",
            "script's handler SIGINT", "checkpoint saved"]


def _lines(out: str) -> list[str]:
    return [line for line in out.splitlines()
            if line.startswith(("trained", "installed", "script's", "checkpoint", "at exit"))]


def _both(tmp_path, source, *args):
    (tmp_path / "train.py").write_text(textwrap.dedent(source))
    plain = subprocess.run([sys.executable, "train.py", *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    tracked = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "train.py", *args],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    return plain, tracked


def test_the_scripts_handlers_take_a_signal_during_its_atexit_handlers(tmp_path):
    plain, tracked = _both(tmp_path, SLOW_SAVE)
    assert plain.returncode == 0 and _lines(plain.stdout) == EXPECTED, plain
    assert tracked.returncode == 0, (tracked.returncode, tracked.stderr)
    assert _lines(tracked.stdout) == EXPECTED, tracked.stdout
    assert "KeyboardInterrupt" not in tracked.stderr
    assert len(memprof.load(str(tmp_path / "train.memprof")).steps) == 3
