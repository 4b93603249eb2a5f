"""What the script's atexit handlers and finalizers (`__del__`) see of `__main__`'s globals
under `memprof run` is what they see under python: python deletes a script's `__file__` and
`__cached__` once its code ended (not when sys.exit ended it), and a `-m` module keeps them;
under memprof run they were always there (a handler that worked under memprof run failed
with NameError under python, and the other way round)."""
import subprocess
import sys
import textwrap

import pytest

SCRIPT = '''
import atexit
import sys

def seen(where):
    g = globals()
    print(where, g.get("__file__", "-"), g.get("__cached__", "-"), g.get("__name__"),
          g.get("__spec__"), type(g.get("__builtins__")).__name__,
          sorted(k for k in g if k.startswith("__")), flush=True)

class Writer:
    def __del__(self):
        seen("del")

atexit.register(seen, "atexit")
writer = Writer()
END = sys.argv[1]
if END == "exit":
    sys.exit(0)
if END == "raise":
    raise ValueError("stop")
'''


def _lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("atexit", "del"))]


@pytest.mark.parametrize("end", ["return", "exit", "raise"])
def test_main_globals_at_exit_are_pythons(tmp_path, end):
    (tmp_path / "train.py").write_text(textwrap.dedent(SCRIPT))
    plain = subprocess.run([sys.executable, "train.py", end], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    tracked = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "train.py", end],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    expected = _lines(plain.stdout)
    assert len(expected) == 2, plain.stdout
    assert ("train.py" in expected[0]) == (end == "exit"), expected   # python's rule, checked
    assert tracked.returncode == plain.returncode, tracked.stderr
    assert _lines(tracked.stdout) == expected
