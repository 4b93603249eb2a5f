"""`signal.signal` / `signal.getsignal`, which memprof run stands in for while its handlers are
in place (cli.signals), are restored through memprof's patch registry, as under python the
script's own stay: one the script replaced meanwhile stays the script's (its getsignal wrapper
was thrown away when the script had kept signal.signal, and memprof's getsignal was left in
place for its atexit handlers when it had replaced signal.signal)."""
import signal
import subprocess
import sys
import textwrap


def _lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("at exit")]


def _both(tmp_path, source, *args):
    (tmp_path / "train.py").write_text(textwrap.dedent(source))
    plain = subprocess.run([sys.executable, "train.py", *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    tracked = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "train.py", *args],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    return plain, tracked


REPLACES = '''
import atexit, signal, sys
import torch

def which(f):
    return "mine" if f is mine else "python's" if f.__module__ == "signal" else f.__module__

if sys.argv[1] == "getsignal":
    def mine(signalnum, _previous=signal.getsignal):
        return _previous(signalnum)
    signal.getsignal = mine
else:
    def mine(signalnum, handler, _previous=signal.signal):
        return _previous(signalnum, handler)
    signal.signal = mine

def at_exit():
    print("at exit", which(signal.getsignal), which(signal.signal),
          signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)

atexit.register(at_exit)
model = torch.nn.Linear(8, 2)
model(torch.randn(4, 8)).sum().backward()
'''


AT_EXIT = {"getsignal": "at exit mine python's True", "signal": "at exit python's mine True"}


def test_signal_functions_the_script_replaced_stay_and_the_others_are_restored(tmp_path):
    for which in ("getsignal", "signal"):
        plain, tracked = _both(tmp_path, REPLACES, which)
        assert plain.returncode == 0, plain.stderr
        assert _lines(plain.stdout) == [AT_EXIT[which]], plain.stdout
        assert tracked.returncode == 0, tracked.stderr
        assert _lines(tracked.stdout) == _lines(plain.stdout), (which, tracked.stdout)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
