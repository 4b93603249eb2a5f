"""The command line: run an unmodified script, report a saved profile, exports, bad input."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

SCRIPT = '''
import sys
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
kept = []
for step in range(int(sys.argv[1])):
    loss = model(torch.randn(8, 16)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    kept.append(loss)          # the leak: a graph per step
'''


def memprof(*args, cwd):
    env = dict(os.environ, COLUMNS="250")  # wide enough that rich does not wrap table cells
    return subprocess.run([sys.executable, "-m", "memprof.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def leaky_script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    return path


def test_run_report_export_and_fail_on_findings(leaky_script, tmp_path):
    r = memprof("run", "-o", "run.memprof", str(leaky_script), "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Findings" in r.stdout and "kept" in r.stdout
    assert (tmp_path / "run.memprof").exists()

    r = memprof("report", "run.memprof", "--json", cwd=tmp_path)
    summary = json.loads(r.stdout)
    assert summary["peak_bytes"] > 0
    assert any(f["kind"] == "retained_graph" and f["holder"] == "kept"
               for f in summary["findings"])
    assert {"Sequential.0", "Sequential.2"} & set(summary["by_module_at_peak"])

    r = memprof("report", "run.memprof", "--export", "r.html", "--export", "t.json",
                "--export", "s.pickle", "--export", "s.pkl", "--fail-on-findings",
                cwd=tmp_path)   # (.pkl, which memprof.export writes, was refused here)
    assert r.returncode == 3, r.stderr
    assert (tmp_path / "s.pkl").read_bytes() == (tmp_path / "s.pickle").read_bytes()
    html = (tmp_path / "r.html").read_text()
    assert "<svg" in html and "Findings" in html
    trace = json.loads((tmp_path / "t.json").read_text())
    assert any(e["name"] == "live bytes" for e in trace["traceEvents"])
    assert any(e["name"] == "backward" and e["ph"] == "X" for e in trace["traceEvents"])
    snap = pickle.loads((tmp_path / "s.pickle").read_bytes())
    actions = {e["action"] for e in snap["device_traces"][0]}
    assert {"segment_alloc", "alloc", "free_requested", "free_completed"} <= actions

    r = memprof("report", "run.memprof", "--export", "x.docx", cwd=tmp_path)
    assert r.returncode == 2 and "unknown export format" in r.stderr
    assert r.stderr.strip().count("\n") == 0

    # --json with --export: stdout is the document alone (the "exported" line went after it)
    r = memprof("report", "run.memprof", "--json", "--export", "again.html", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["peak_bytes"] > 0
    assert "exported" in r.stderr and (tmp_path / "again.html").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="'auto' finds this machine's GPU")
def test_budget_auto_without_a_gpu_is_one_line(leaky_script, tmp_path):
    """It was a traceback ending in NoGPUError (the unknown-GPU message even offers 'auto')."""
    assert memprof("run", "-o", "run.memprof", str(leaky_script), "2",
                   cwd=tmp_path).returncode == 0
    for cmd in (("report", "--budget", "auto", "run.memprof"),
                ("run", "--budget", "auto", str(leaky_script), "2")):
        r = memprof(*cmd, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().startswith("memprof: --budget auto: lookup('auto'): no CUDA GPU")
        assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_a_reader_that_closes_the_pipe_gets_no_traceback(leaky_script, tmp_path):
    """`memprof report run.memprof --json | head -c 100`: a BrokenPipeError traceback on
    stderr, in about half the runs (where the JSON outgrew the pipe before head closed it).
    Here the pipe is closed before the command prints anything: every write fails."""
    assert memprof("run", "-o", "run.memprof", str(leaky_script), "2", cwd=tmp_path).returncode == 0
    env = dict(os.environ, COLUMNS="250")
    for extra in (["--json"], []):
        proc = subprocess.Popen([sys.executable, "-m", "memprof.cli", "report", "run.memprof",
                                 *extra], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        proc.stdout.close()   # the reader is gone before the first line
        err = proc.stderr.read()
        assert proc.wait(timeout=300) == 1, (extra, err)
        assert err == "", (extra, err)


def test_a_closed_pipe_of_the_users_own_code_is_not_hidden():
    """Only stdout's reader going away is a quiet status 1: a BrokenPipeError from the code a
    command runs (a model factory's socket) is raised as it is."""
    import argparse
    from memprof import cli

    class Failing:
        def run(self, args):
            raise BrokenPipeError(32, "Broken pipe (a socket of the user's)")
    with pytest.raises(BrokenPipeError, match="a socket of the user's"):
        cli._run(argparse.Namespace(command_object=Failing(), command="recommend"))


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "junk.memprof").write_text("nope")
    r = memprof("report", "junk.memprof", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not a readable memprof profile" in r.stderr
    r = memprof("run", "missing.py", cwd=tmp_path)
    assert r.returncode == 2 and "no such file" in r.stderr
    r = memprof("report", "x.memprof", cwd=tmp_path)
    assert r.returncode == 2 and "x.memprof" in r.stderr


def test_script_exit_code_and_crash_are_kept(tmp_path):
    (tmp_path / "crash.py").write_text("import torch\nx = torch.ones(100)\nraise SystemExit(7)\n")
    r = memprof("run", "crash.py", cwd=tmp_path)
    assert r.returncode == 7
    assert os.path.exists(tmp_path / "crash.memprof")


def test_gpus_table(tmp_path):
    r = memprof("gpus", "--json", cwd=tmp_path)
    rows = json.loads(r.stdout)
    v100 = next(g for g in rows if g["name"] == "v100-16gb")
    assert v100["memory_bytes"] == 16160 * 2**20 and v100["bf16"] is None


def test_version_names_memprof_torch_and_python(tmp_path):
    """The first line of a bug report (`memprof --version` was an unrecognized argument)."""
    import memprof as package
    r = memprof("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith(f"memprof {package.__version__} (torch {torch.__version__}")
    assert sys.version.split()[0] in r.stdout


@pytest.mark.slow
def test_demo_tells_the_story(tmp_path):
    r = memprof("demo", "--quick", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = " ".join(r.stdout.split())
    assert "held by _train.<locals>.attention_maps_for_plots" in out
    assert "Fixed run: no findings" in out
    assert "fused / math peak" in out
    assert "micro-batch 8 without checkpointing does not fit" in out
    # 5: a leaking run SIGKILLed as the OOM killer would: its profile, saved while it ran
    assert "exit status 137 (killed by SIGKILL)" in out
    assert "the run never saved its end: it was killed outright" in out
    assert "held by losses:" in out
