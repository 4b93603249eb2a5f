"""`memprof run` never says a profile was saved unless it was, saves on SIGTERM and through a
second Ctrl-C, and reports text with square brackets as it is (issue 15, items 3, 5, 7)."""
import os
import signal
import subprocess
import sys
import time

import pytest

TRAIN = '''
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
def step():
    model(torch.randn(8, 16)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
'''


def memprof(*args, cwd, env=None, **kw):
    env = env or dict(os.environ, COLUMNS="250")
    return subprocess.run([sys.executable, "-m", "memprof.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def start(*args, cwd):
    env = dict(os.environ, COLUMNS="250")
    # a suite started in the background of a shell without job control inherits SIGINT
    # ignored, and one under nohup SIGHUP, and so would the script (python keeps an ignored
    # signal ignored, and so does memprof run)
    return subprocess.Popen([sys.executable, "-m", "memprof.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _loads(path) -> bool:
    r = subprocess.run([sys.executable, "-c", f"import memprof; memprof.load({str(path)!r})"],
                       capture_output=True, text=True, timeout=120)
    return r.returncode == 0


def test_output_in_a_missing_directory_is_refused_and_never_called_saved(tmp_path):
    (tmp_path / "train.py").write_text(TRAIN + "step()\n")
    r = memprof("run", "-o", "/nonexistent/dir/x.memprof", "train.py", cwd=tmp_path)
    assert r.returncode != 0
    assert "profile saved to" not in r.stdout + r.stderr
    assert "/nonexistent/dir" in r.stderr


def test_a_save_that_fails_after_the_run_is_saved_elsewhere_and_exits_non_zero(tmp_path):
    """The directory exists when the run starts and is gone when the profile is written (or
    its disk is full): the run's profile was lost. It goes to the temporary directory, the
    last lines say where, and the status says it is not where -o asked."""
    (tmp_path / "out").mkdir()
    (tmp_path / "tmp").mkdir()
    (tmp_path / "train.py").write_text(TRAIN + "step()\nimport os\nos.rmdir('out')\n")
    r = memprof("run", "-o", "out/x.memprof", "train.py", cwd=tmp_path,
                env=dict(os.environ, COLUMNS="250", TMPDIR=str(tmp_path / "tmp")))
    assert r.returncode == 1
    saved = [p for p in os.listdir(tmp_path / "tmp") if p.endswith(".memprof")]
    assert len(saved) == 1 and saved[0].endswith("x.memprof")
    fallback = str(tmp_path / "tmp" / saved[0])
    assert f"could not save the profile to {tmp_path / 'out' / 'x.memprof'}" in r.stderr
    assert f"saved it to {fallback} instead" in r.stderr
    assert r.stdout.rstrip().splitlines()[-1] == \
        f"profile saved to tmp/{saved[0]} instead: could not save it to " \
        f"{tmp_path / 'out' / 'x.memprof'} (directory {str(tmp_path / 'out')!r} does not exist)"
    assert _loads(fallback)


def test_a_profile_that_cannot_be_saved_anywhere_is_said_last(tmp_path):
    (tmp_path / "out").mkdir()
    # (a temporary directory where no file can be made, even by root)
    (tmp_path / "train.py").write_text(TRAIN + "step()\nimport os, tempfile\nos.rmdir('out')\n"
                                       "tempfile.tempdir = '/proc'\n")
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc (Linux): a directory where even root cannot create a file")
    r = memprof("run", "-o", "out/x.memprof", "train.py", cwd=tmp_path)
    assert r.returncode == 1
    assert "profile saved to" not in r.stdout + r.stderr
    last = r.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"memprof: the profile was not saved: could not save it to "
                           f"{tmp_path / 'out' / 'x.memprof'}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_saves_the_profile_then_ends_the_process_by_it(tmp_path, sig):
    """SIGHUP: the terminal or SSH session that ran the job closed (before the first
    autosave, a minute in, nothing was left)."""
    (tmp_path / "forever.py").write_text(
        TRAIN + "import sys\nstep()\nprint('ready', flush=True)\nwhile True:\n    step()\n")
    p = start("run", "forever.py", cwd=tmp_path)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    assert p.returncode == -sig, err[-2000:]   # as `python forever.py` ends: by the signal
    assert "profile saved to forever.memprof" in out
    assert _loads(tmp_path / "forever.memprof")


# The script's first Ctrl-C is its own; a helper thread keeps pressing Ctrl-C while memprof
# finishes the block (the main thread is inside Tracker.__exit__) until the profile exists.
SECOND_CTRL_C = TRAIN + '''
import os, signal, sys, threading, time
step(); step()
OUT = os.path.abspath("forever.memprof")
def finishing():
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_name == "__exit__" and frame.f_code.co_filename.endswith("track.py"):
            return True
        frame = frame.f_back
    return False
def keep_pressing():
    deadline = time.monotonic() + 20
    while not finishing() and time.monotonic() < deadline:
        time.sleep(0.0005)
    while not os.path.exists(OUT) and time.monotonic() < deadline:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.002)
threading.Thread(target=keep_pressing, daemon=True).start()
raise KeyboardInterrupt
'''


def test_a_second_ctrl_c_while_saving_does_not_lose_the_profile(tmp_path):
    (tmp_path / "forever.py").write_text(SECOND_CTRL_C)
    r = memprof("run", "forever.py", cwd=tmp_path)
    saved = (tmp_path / "forever.memprof").exists()
    if "profile saved to forever.memprof" in r.stdout:
        assert saved
    assert saved and _loads(tmp_path / "forever.memprof"), r.stderr[-2000:]
    assert r.returncode == -signal.SIGINT, r.stderr[-2000:]
    assert "exiting once the profile is saved" in r.stderr   # Ctrl-C did come while saving


def test_square_brackets_in_errors_and_names_are_printed_as_they_are(tmp_path):
    (tmp_path / "brackets.py").write_text(TRAIN + '''
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleDict({"[bold]x": torch.nn.Linear(16, 1000)})
    def forward(self, x):
        return self.blocks["[bold]x"](x)
keep = Net()(torch.randn(64, 16))   # the largest block alive, in a module named with brackets
step()
raise RuntimeError("[/data/x] is empty [enforce fail at alloc_cpu.cpp:127]")
''')
    r = memprof("run", "brackets.py", cwd=tmp_path)
    assert "MarkupError" not in r.stderr, r.stderr[-2000:]
    out = " ".join(r.stdout.split())
    assert "[/data/x] is empty [enforce fail at alloc_cpu.cpp:127]" in out
    assert "blocks.[bold]x" in out
    assert r.returncode == 1
    r = memprof("report", "brackets.memprof", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[enforce fail at alloc_cpu.cpp:127]" in " ".join(r.stdout.split())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without GPU")
def test_gpu_auto_without_a_gpu_is_one_line(tmp_path):
    start_t = time.monotonic()
    r = memprof("recommend", "--gpu", "auto", "--model", "mlp", "--effective-batch", "8",
                cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert "no CUDA GPU" in r.stderr
    assert time.monotonic() - start_t < 120


def test_a_script_that_changes_directory_saves_where_memprof_run_started(tmp_path):
    """hydra (< 1.2) runs every job in a new working directory: the default output, relative,
    was saved there - inside the script's new directory, under the name it printed."""
    (tmp_path / "train.py").write_text(TRAIN + (
        "import os\n"
        "os.makedirs('outputs/run1')\n"
        "os.chdir('outputs/run1')\n"
        "for _ in range(2):\n"
        "    step()\n"))
    proc = memprof("run", "train.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "profile saved to train.memprof" in proc.stdout
    assert _loads(tmp_path / "train.memprof")
    assert not (tmp_path / "outputs" / "run1" / "train.memprof").exists()


LOADER_LOOP = '''
import torch, time
class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 10 ** 6
    def __getitem__(self, i):
        time.sleep(0.001)
        return torch.randn(16), torch.randn(4)
model = torch.nn.Linear(16, 4)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loader = torch.utils.data.DataLoader(Data(), batch_size=8, num_workers=2)
for i, (x, y) in enumerate(loader):
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    opt.zero_grad()
    if i == 5:
        print("ready", flush=True)
'''


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_the_whole_process_group_with_loader_workers_saves_the_profile(tmp_path,
                                                                                 sig):
    """A closed terminal or `scancel` signals the job's process group: the DataLoader's
    workers, which had inherited memprof's handler, died with a traceback and torch's SIGCHLD
    handler raised inside the save - the profile lost in most runs, exit status 1."""
    (tmp_path / "loader.py").write_text(LOADER_LOOP)
    env = dict(os.environ, COLUMNS="250")
    p = subprocess.Popen([sys.executable, "-m", "memprof.cli", "run", "loader.py"],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    assert p.stdout.readline().strip() == "ready"
    os.killpg(p.pid, sig)
    out, err = p.communicate(timeout=300)
    assert p.returncode == -sig, err[-2000:]
    assert "profile saved to loader.memprof" in out and "Traceback" not in err, err[-2000:]
    assert _loads(tmp_path / "loader.memprof")


POOL = '''
import multiprocessing as mp, torch
def work(x):
    return x * x
if __name__ == "__main__":
    m = torch.nn.Linear(4, 2)
    m(torch.randn(3, 4)).sum().backward()
    for _ in range(4):
        with mp.get_context("fork").Pool(2) as pool:   # __exit__: terminate(), SIGTERM
            assert pool.map(work, [1, 2, 3]) == [1, 4, 9]
    print("done", flush=True)
'''


def test_a_fork_pools_terminate_ends_its_workers_as_without_memprof(tmp_path):
    """Pool.__exit__ SIGTERMs its workers: inherited, memprof's handler raised `Terminated`
    in them (tracebacks), or caught a SIGTERM the child then dropped - the run hung."""
    (tmp_path / "pool.py").write_text(POOL)
    r = memprof("run", "pool.py", cwd=tmp_path)
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]
    assert "Terminated" not in r.stderr, r.stderr[-2000:]


def test_output_on_a_fifo_is_refused_and_through_a_link_saves_the_linked_file(tmp_path):
    """`-o /dev/null` as root replaced the device node with a profile (a FIFO here, the same
    check); a symbolic link was replaced by the file, its target left stale."""
    (tmp_path / "train.py").write_text(TRAIN + "step()\n")
    os.mkfifo(tmp_path / "fifo.memprof")
    r = memprof("run", "-o", "fifo.memprof", "train.py", cwd=tmp_path)
    assert r.returncode == 2 and "is not a regular file" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    import stat
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo.memprof").st_mode)
    (tmp_path / "real").mkdir()
    os.symlink("real/run.memprof", tmp_path / "link.memprof")
    r = memprof("run", "-o", "link.memprof", "train.py", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert os.path.islink(tmp_path / "link.memprof") and _loads(tmp_path / "real/run.memprof")


SIGNALS_IN_A_CHILD = '''
import os, signal
signal.signal(signal.SIGTERM, lambda *a: None)     # the script's own
signal.signal(signal.SIGINT, signal.SIG_IGN)        # workers ignore Ctrl-C, as before a Pool
pid = os.fork()
if pid == 0:
    print("child", signal.getsignal(signal.SIGINT), type(signal.getsignal(signal.SIGTERM)).__name__,
          flush=True)
    os._exit(0)
os.waitpid(pid, 0)
'''


def test_a_forked_child_keeps_the_handlers_the_script_set(tmp_path):
    """The child got every handled signal's default back, also where the script had set its
    own (its SIGTERM handler gone, Ctrl-C no longer ignored in a Pool's workers)."""
    (tmp_path / "child.py").write_text(SIGNALS_IN_A_CHILD)
    plain = subprocess.run([sys.executable, "child.py"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    r = memprof("run", "child.py", cwd=tmp_path)
    assert r.returncode == plain.returncode == 0, r.stderr
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("child")] == \
        plain.stdout.splitlines()


def test_output_through_a_dangling_link_is_refused_before_the_run(tmp_path):
    """The link's directory was checked, the missing one it points into was not: the script
    ran, then the profile could not be saved."""
    (tmp_path / "train.py").write_text(TRAIN + "step()\nprint('ran', flush=True)\n")
    os.symlink(tmp_path / "missing" / "x.memprof", tmp_path / "dangling.memprof")
    r = memprof("run", "-o", "dangling.memprof", "train.py", cwd=tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr and "ran" not in r.stdout, \
        r.stderr
