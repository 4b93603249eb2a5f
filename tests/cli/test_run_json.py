"""`memprof run --json`: stdout holds the one document, whatever the script prints - its own
lines (a Trainer's log dicts), a child process's - which go to stderr instead."""
import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import subprocess, sys
    import torch
    print("starting", flush=True)
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        loss = model(torch.randn(4, 8)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        print({"loss": round(loss.item(), 4), "step": step})   # buffered: stdout is a pipe
    subprocess.run([sys.executable, "-c", "print('from a child process')"], check=True)
    import ctypes
    ctypes.CDLL(None).printf(b"from C's stdio\\n")   # native code's own buffered output
    sys.stdout.write("no newline at the end")
''')


def test_the_scripts_output_goes_to_stderr_and_stdout_is_one_document(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}   # as a user's shell
    r = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--json", str(script)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(env, COLUMNS="250"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)   # nothing but the document
    assert len(doc["steps"]) == 3 and doc["events"] > 0
    for line in ("starting", "'step': 2", "from a child process", "from C's stdio",
                 "no newline at the end"):
        assert line in r.stderr
    # in the order the script printed them
    assert r.stderr.index("starting") < r.stderr.index("'step': 0") < \
        r.stderr.index("from a child process")
    assert (tmp_path / "train.memprof").exists()
    # the same document as `memprof report --json` of the saved file (run's lacked the
    # partial-step marks, budget and fit)
    again = subprocess.run([sys.executable, "-m", "memprof.cli", "report", "--json",
                            "train.memprof"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    saved = json.loads(again.stdout)
    assert set(doc) == set(saved) and {"partial_last_step", "budget", "fit"} <= set(doc)
    assert [set(s) for s in doc["steps"]] == [set(s) for s in saved["steps"]]
    assert doc["steps"] == saved["steps"] and doc["peak_bytes"] == saved["peak_bytes"]


def test_without_json_the_scripts_output_stays_on_stdout(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, "-m", "memprof.cli", "run", str(script)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, COLUMNS="250"))
    assert r.returncode == 0, r.stderr
    assert "starting" in r.stdout and "from a child process" in r.stdout
    assert "starting" not in r.stderr


def test_what_the_script_prints_at_exit_goes_to_stderr_too(tmp_path):
    """An atexit handler's line (a tracker's "run synced"), printed after the document, made
    `memprof run --json train.py | jq` fail with "Extra data"."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent('''
        import atexit
        import torch
        atexit.register(lambda: print("run synced at exit"))
        model = torch.nn.Linear(8, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    '''))
    r = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--json", str(script)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["steps"]) == 3
    assert r.stderr.rstrip().endswith("run synced at exit")
