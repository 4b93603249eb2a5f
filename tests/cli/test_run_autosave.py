"""`memprof run --autosave S`: a script killed outright (SIGKILL, as the kernel's OOM killer
does: exit status 137, no exit path runs) still leaves its profile - saved at a step end while
it ran, marked partial, its leak named - and a torchrun job's merged report says which rank
was killed. Seed 004: "Training processes keep getting KILLED by OOM (exit code 137)"."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import memprof

# a loop that keeps every step's loss (and its graph) and kills itself, as the OOM killer
# would, once memprof has saved twice while it ran (the file appeared, then changed)
KILLED_LOOP = '''
import os, signal, time, torch
OUT = os.environ["OUT"]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
kept, seen = [], []
deadline = time.monotonic() + float(os.environ.get("LIMIT_S", "60"))
for step in range(1_000_000):
    loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 16)),
                                             torch.randint(0, 4, (8,)))
    opt.zero_grad(); loss.backward(); opt.step()
    kept.append(loss)
    if os.path.exists(OUT) and (not seen or os.stat(OUT).st_mtime_ns != seen[-1]):
        seen.append(os.stat(OUT).st_mtime_ns)
    if len(seen) >= int(os.environ.get("SAVES", "2")) or time.monotonic() > deadline:
        print(f"killed at step {step}, saves seen {len(seen)}", flush=True)
        if os.environ.get("KILL", "1") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        break
    time.sleep(0.002)
'''


def _memprof(tmp_path, *args, env=None):
    return subprocess.run([sys.executable, "-m", "memprof.cli", *args], cwd=tmp_path,
                          env=dict(os.environ, COLUMNS="200", **(env or {})),
                          capture_output=True, text=True, timeout=300)


def test_a_run_killed_outright_leaves_its_profile_with_the_leak_named(tmp_path):
    (tmp_path / "train.py").write_text(KILLED_LOOP)
    r = _memprof(tmp_path, "run", "--autosave", "0.2", "train.py",
                 env={"OUT": "train.memprof"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "saves seen 2" in r.stdout
    prof = memprof.load(str(tmp_path / "train.memprof"))
    assert prof.meta["partial"]["steps_ended"] > 0
    leaks = [f for f in prof.findings if f.kind == "retained_graph"]
    assert leaks and leaks[0].holder == "kept"
    shown = _memprof(tmp_path, "report", "train.memprof")
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "the run never saved its end: it was killed outright (SIGKILL" in text
    assert "held by kept" in text
    as_json = json.loads(_memprof(tmp_path, "report", "--json", "train.memprof").stdout)
    assert as_json["meta"]["partial"]["steps_ended"] == prof.meta["partial"]["steps_ended"]
    html = _memprof(tmp_path, "report", "--export", "page.html", "train.memprof")
    assert html.returncode == 0, html.stderr
    assert "never saved its end" in (tmp_path / "page.html").read_text()


def test_autosave_0_saves_at_the_end_only(tmp_path):
    (tmp_path / "train.py").write_text(KILLED_LOOP + '''
print("file while running:", os.path.exists(OUT))
''')
    r = _memprof(tmp_path, "run", "--autosave", "0", "train.py",
                 env={"OUT": "train.memprof", "LIMIT_S": "1", "KILL": "0"})
    assert r.returncode == 0, r.stderr
    assert "saves seen 0" in r.stdout and "file while running: False" in r.stdout
    prof = memprof.load(str(tmp_path / "train.memprof"))
    assert "partial" not in prof.meta and "autosave" not in prof.run.records


def test_each_rank_gets_the_autosave_given_0_included():
    """`--autosave 0` reached no rank: an option at its default is not passed on, and 0 was
    parsed to None, which counted as not given - the ranks saved every 60 s."""
    from memprof.cli import build_parser, parse
    from memprof.cli.run import COMMAND
    build_parser()
    for given, passed in (("0", ["--autosave", "0.0"]), ("5", ["--autosave", "5.0"]),
                          ("60", [])):
        args = parse(["run", "--nproc-per-node", "2", "--autosave", given, "train.py"])
        assert COMMAND._memprof_options(args) == passed


@pytest.mark.parametrize("bad", ["-1", "soon", "inf"])
def test_a_bad_autosave_is_one_line(tmp_path, bad):
    r = _memprof(tmp_path, "run", "--autosave", bad, "train.py")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(
        "memprof run: error: argument --autosave: expected a number of seconds")


def test_a_rank_killed_outright_is_named_in_the_merged_report(tmp_path):
    # rank 1 is killed as the OOM killer would; torchrun then stops rank 0 (SIGTERM), whose
    # block saves its end
    (tmp_path / "train.py").write_text('''
import os, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
os.environ["OUT"] = f"job.rank{rank}.memprof"
os.environ["KILL"] = "1" if rank == 1 else "0"
if rank == 0:
    os.environ["SAVES"] = "1000000"
''' + KILLED_LOOP + '''
while True:   # rank 0 trains on until torchrun stops it
    time.sleep(0.05)
''')
    r = _memprof(tmp_path, "run", "--nproc-per-node", "2", "--autosave", "0.2", "-o",
                 "job.memprof", "train.py", env={"LIMIT_S": "60"})
    assert r.returncode != 0
    assert "memprof run: rank 1 failed first (exit -9, SIGKILL: the kernel's OOM killer" \
        in r.stderr
    # rank 0 did not fail: the launcher stopped it (it read "2 of 2 ranks did not finish")
    assert "; 1 other rank was stopped by SIGTERM (the launcher stops the others once one " \
        "fails)" in " ".join(r.stderr.split())
    killed = memprof.load(str(tmp_path / "job.rank1.memprof"))
    stopped = memprof.load(str(tmp_path / "job.rank0.memprof"))
    assert killed.meta["partial"]["steps_ended"] > 0 and killed.meta["rank"] == 1
    assert "partial" not in stopped.meta and stopped.meta["rank"] == 0
    merged = _memprof(tmp_path, "report", "job.rank0.memprof", "job.rank1.memprof")
    assert merged.returncode == 0, merged.stderr
    text = " ".join(merged.stdout.split())
    assert "rank 1's profile was saved while it ran" in text
    assert "rank 0's profile was saved while it ran" not in text
