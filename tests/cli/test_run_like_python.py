"""`memprof run script.py` behaves like `python script.py` (issue 14): the script is the real
__main__ (pickling its classes, spawn workers), its exceptions and syntax errors read as
Python prints them, sys.exit(msg) prints msg, and arguments after the script are the script's."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import memprof as memprof_pkg


def run(tmp_path, source, *args, before=()):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ, COLUMNS="250")
    return subprocess.run([sys.executable, "-m", "memprof.cli", "run", *before, str(script),
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300), script


def test_classes_of_the_script_pickle_and_spawn_workers_start(tmp_path):
    r, _ = run(tmp_path, '''
        import torch
        from torch.utils.data import DataLoader, Dataset

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(4, 2)

            def forward(self, x):
                return self.fc(x)

        class Data(Dataset):
            def __len__(self):
                return 4

            def __getitem__(self, i):
                return torch.full((4,), float(i))

        if __name__ == "__main__":
            model = Net()
            torch.save(model, "net.pt")
            back = torch.load("net.pt", weights_only=False)
            assert type(back).__name__ == "Net" and type(back).__module__ == "__main__"
            loader = DataLoader(Data(), batch_size=2, num_workers=1,
                                multiprocessing_context="spawn")
            total = sum(float(model(x).sum()) for x in loader)
            print("batches ok")
        ''')
    assert r.returncode == 0, r.stderr
    assert "batches ok" in r.stdout and "profile saved to train.memprof" in r.stdout


def test_an_exception_prints_pythons_traceback_then_the_report(tmp_path):
    r, script = run(tmp_path, '''
        import torch

        def step():
            x = torch.ones(3)
            raise ValueError("boom in step")

        step()
        ''')
    assert r.returncode == 1
    err = r.stderr
    assert "Traceback (most recent call last):" in err
    assert f'File "{script}", line 8, in <module>' in err
    assert f'File "{script}", line 6, in step' in err and "ValueError: boom in step" in err
    assert "memprof/cli" not in err and "memprof/track" not in err   # only the script's frames
    assert "peak live memory" in r.stdout                                # then the report
    assert memprof_pkg.load(str(tmp_path / "train.memprof")).meta["error"].startswith(
        "ValueError: boom in step")


def test_a_syntax_error_reads_as_python_says_it(tmp_path):
    r, script = run(tmp_path, "x = 1\nif x\n    print(x)\n")
    assert r.returncode == 1
    assert f'File "{script}", line 2' in r.stderr and "SyntaxError" in r.stderr
    assert "Traceback" not in r.stderr and "memprof" not in r.stderr.replace(str(script), "")


def test_sys_exit_with_a_message_prints_it(tmp_path):
    r, _ = run(tmp_path, 'import sys\nsys.exit("stopping: no data")\n')
    assert r.returncode == 1 and r.stderr == "stopping: no data\n"   # as Python prints it
    assert "ended with sys.exit('stopping: no data')" in r.stdout
    r, _ = run(tmp_path, 'import sys\nsys.exit(3)\n')
    assert r.returncode == 3 and r.stderr == ""   # an exit is not a crash: nothing added
    assert "The tracked code ended with sys.exit(3)" in r.stdout
    # the value as the script wrote it (it read sys.exit('True'), sys.exit('[1, 2]'))
    r, _ = run(tmp_path, 'import sys\nsys.exit(True)\n')
    assert r.returncode == 1 and "ended with sys.exit(True)" in r.stdout
    r, _ = run(tmp_path, 'import sys\nsys.exit([1, 2])\n')
    assert r.returncode == 1 and "ended with sys.exit([1, 2])" in r.stdout


def test_sys_exit_0_is_a_normal_end_not_an_error(tmp_path):
    for call in ("sys.exit(0)", "sys.exit()"):
        r, _ = run(tmp_path, f'import sys\nprint("done")\n{call}\n')
        assert r.returncode == 0 and "done" in r.stdout
        assert "raised" not in r.stderr and "raised" not in r.stdout, (call, r.stdout, r.stderr)


def test_options_after_the_script_are_the_scripts(tmp_path):
    r, _ = run(tmp_path, 'import sys\nprint("argv", sys.argv[1:])\n', "-o", "mine.txt",
               before=("-o", "theirs.memprof"))
    assert r.returncode == 0, r.stderr
    assert "argv ['-o', 'mine.txt']" in r.stdout
    assert (tmp_path / "theirs.memprof").exists() and not (tmp_path / "mine.txt").exists()


def test_argv_and_path_are_restored_in_process(tmp_path):
    from memprof.cli import main
    script = tmp_path / "s.py"
    script.write_text("import sys\nsys.path.append('added-by-script')\n")
    argv, path = list(sys.argv), list(sys.path)
    assert main(["run", "-o", str(tmp_path / "s.memprof"), str(script), "x"]) == 0
    assert sys.argv == argv and sys.path == path
    assert sys.modules["__main__"].__name__ == "__main__" and not hasattr(
        sys.modules["__main__"], "added")


def test_a_leak_in_main_is_found_and_its_holder_named(tmp_path):
    """The usual script layout: the loop in a function called under `if __name__ ==
    "__main__"`; by the time the script ends, the function and its graphs are gone, and the
    leak is named from what memprof saw while it ran."""
    r, _ = run(tmp_path, '''
        import torch

        def train():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                        torch.nn.Linear(16, 2))
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            losses = []
            for _ in range(5):
                loss = model(torch.randn(4, 8)).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss)
            print("done", len(losses))

        if __name__ == "__main__":
            train()
    ''', before=["-o", str(tmp_path / "t.memprof")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "done 5" in r.stdout
    assert "held by train.<locals>.losses" in r.stdout


def test_relative_script_traceback_names_the_full_path_as_python_does(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("def step():\n    raise ValueError('boom')\n\nstep()\n")
    r = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "train.py"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    py = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300)
    assert r.returncode == py.returncode == 1
    assert f'File "{script}", line 2, in step' in py.stderr   # Python: the full path
    assert f'File "{script}", line 2, in step' in r.stderr


def test_ctrl_c_prints_the_traceback_and_ends_by_the_signal_as_python_does(tmp_path):
    r, script = run(tmp_path, '''
        import atexit
        atexit.register(lambda: print("atexit ran", flush=True))

        def loop():
            raise KeyboardInterrupt   # what Ctrl-C raises in the running frame

        loop()
        ''')
    py = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=300)
    # Python finalizes, then dies by SIGINT (a shell loop stops; not a status of 130)
    assert py.returncode == -signal.SIGINT and "atexit ran" in py.stdout
    assert r.returncode == py.returncode, r.stderr[-2000:]
    assert "atexit ran" in r.stdout
    assert f'File "{script}", line 6, in loop' in r.stderr and "KeyboardInterrupt" in r.stderr
    assert "stopped by Ctrl-C" in r.stderr and (tmp_path / "train.memprof").exists()


def test_step_on_without_a_script_asks_for_the_script_only(capsys):
    from memprof.cli import main
    assert main(["run", "--step-on", "optimizer"]) == 2
    err = capsys.readouterr().err
    assert err == "memprof: run: expected a script (memprof run train.py ...) or -m MODULE\n"


_SHOWS_ITSELF = '''
import os, sys, torch
print("argv", sys.argv[1:], "name", __name__, "package", repr(__package__),
      "path0", sys.path[0] in (os.getcwd(), os.path.dirname(os.path.abspath(__file__))))
model = torch.nn.Linear(4, 4)
model(torch.randn(2, 4)).sum().backward()
'''


def _both(tmp_path, *args):
    """(python's run, memprof run's) of the same command line, in tmp_path."""
    env = dict(os.environ, COLUMNS="250")
    plain = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    tracked = subprocess.run([sys.executable, "-m", "memprof.cli", "run", *args], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
    return plain, tracked


def test_modules_packages_and_directories_run_as_python_runs_them(tmp_path):
    """`memprof run -m trainmod x` was refused ("unrecognized arguments: -m"), and `memprof
    run app/` (a directory with a __main__.py) was "no such file"; arguments after -m NAME
    (a script's own `-o`) and a `--` are the script's, as for python."""
    (tmp_path / "trainmod.py").write_text(_SHOWS_ITSELF)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "mymod.py").write_text(_SHOWS_ITSELF)
    (tmp_path / "pkg" / "__main__.py").write_text(_SHOWS_ITSELF)
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__main__.py").write_text(_SHOWS_ITSELF)
    cases = {("-m", "trainmod", "x", "-o", "y", "--json"): "trainmod.memprof",
             ("-m", "pkg.mymod", "a"): "pkg.mymod.memprof",
             ("-m", "pkg", "--", "b"): "pkg.memprof",
             ("app", "c"): "app.memprof",
             ("trainmod.py", "--", "x"): "trainmod.memprof"}
    for args, profile in cases.items():
        plain, tracked = _both(tmp_path, *args)
        assert plain.returncode == 0 and tracked.returncode == 0, (args, tracked.stderr)
        first = tracked.stdout.splitlines()[0]
        assert first == plain.stdout.strip(), (args, first, plain.stdout)
        assert f"profile saved to {profile}" in tracked.stdout, (args, tracked.stdout[-300:])
        assert memprof_pkg.load(str(tmp_path / profile)).peak > 0


def test_an_unknown_module_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "-m", "no_such_module"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "memprof: -m 'no_such_module': no module of that name (a .py file or package on "
        "sys.path, the current directory first)"]


def test_a_reader_that_stops_early_leaves_the_scripts_status(tmp_path):
    """`memprof run s.py | head -1`: Python's exit status is 0 (its output fit the pipe);
    memprof's report, written after the reader left, made it 1."""
    script = tmp_path / "s.py"
    script.write_text(_SHOWS_ITSELF)
    proc = subprocess.Popen([sys.executable, "-m", "memprof.cli", "run", str(script)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()   # the reader is gone before the report
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert first.startswith(b"argv [] name __main__") and not err
    assert memprof_pkg.load(str(tmp_path / "s.memprof")).peak > 0


def test_abbreviated_options_still_come_before_the_script(tmp_path):
    """argparse takes `--out` for `--output`: the script's arguments begin after its value."""
    (tmp_path / "s.py").write_text(_SHOWS_ITSELF)
    plain, _ = _both(tmp_path, "s.py", "x")
    r = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--out", "o.memprof",
                        "--batch", "4", "s.py", "x"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == plain.stdout.strip()
    assert "profile saved to o.memprof" in r.stdout


def test_each_rank_of_a_module_gets_its_arguments_once():
    """`--nproc-per-node N -m pkg.train a b`: each rank's command line carried `-m pkg.train`
    twice (the module saw ['-m', 'pkg.train', 'a', 'b'])."""
    from memprof.cli import build_parser, parse
    from memprof.cli.run import COMMAND
    build_parser()
    args = parse(["run", "--nproc-per-node", "2", "--batch-size", "4", "-m", "pkg.train",
                  "a", "b"])
    assert COMMAND._memprof_options(args) == ["--batch-size", "4"]
    assert args.module == "pkg.train" and args.script_args == ["a", "b"]


def test_a_package_that_raises_while_imported_fails_as_under_python(tmp_path):
    """Its __init__ raised inside memprof's own frames, and saw memprof's sys.argv."""
    (tmp_path / "badpkg").mkdir()
    (tmp_path / "badpkg" / "__init__.py").write_text(
        "import sys\nprint('init argv', sys.argv)\nraise RuntimeError('config missing')\n")
    (tmp_path / "badpkg" / "train.py").write_text("print('never')\n")
    plain, tracked = _both(tmp_path, "-m", "badpkg.train", "a")
    assert plain.returncode == tracked.returncode == 1
    assert tracked.stdout == plain.stdout == "init argv ['-m', 'a']\n"
    assert tracked.stderr.strip().splitlines()[-1] == "RuntimeError: config missing"
    assert "memprof" not in tracked.stderr.replace(str(tmp_path), "")


_LISTS_ITS_GLOBALS = '''
import sys
import helper
def show(k, v):
    return (type(v).__name__ if k == "__loader__" else
            f"{v.name} {v.loader.path} {v.origin}" if k == "__spec__" and v else str(v))
shown = {k: show(k, v) for k, v in globals().items() if k.startswith("__") and k != "__builtins__"}
print(list(shown.items()), sys.path[0], sys.argv[0], helper.X)
'''


def test_symlinked_and_unnormalised_paths_give_pythons_main_module(tmp_path):
    """A script reached through a symlink (`runs/train.py -> ../code/train.py`) imports the
    modules beside the file it points to, as under python: memprof run put the symlink's
    directory first on sys.path (ModuleNotFoundError). And the __main__ module is python's:
    `__file__` absolute but not normalised (`other/../code/train.py`), a SourceFileLoader
    (it had none), `__cached__`, its names in python's order; a directory's sys.path[0] as
    given (a trailing slash kept)."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text(_LISTS_ITS_GLOBALS)
    (code / "helper.py").write_text("X = 42\n")
    (code / "app").mkdir()
    (code / "app" / "__main__.py").write_text(_LISTS_ITS_GLOBALS)
    (code / "app" / "helper.py").write_text("X = 43\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "runs").mkdir()
    os.symlink("../code/train.py", tmp_path / "runs" / "train.py")
    os.symlink("code/app", tmp_path / "applink")
    for args in (["runs/train.py"], ["other/../code/train.py"], ["./code/app/"], ["applink/"],
                 ["applink"]):
        plain, tracked = _both(tmp_path, *args)
        assert plain.returncode == 0 and tracked.returncode == 0, (args, tracked.stderr)
        assert tracked.stdout.splitlines()[0] == plain.stdout.strip(), (args, tracked.stdout)


def test_a_ctrl_c_signal_prints_pythons_traceback_without_memprofs_handler(tmp_path):
    """A real SIGINT (not a KeyboardInterrupt raised by the script): memprof's handler raises
    it, and its frame (`signals.py, in _handle`) was printed below the script's, where
    Python's own handler raises it in the interrupted frame."""
    r, script = run(tmp_path, '''
        import os, signal, time

        def loop():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)

        loop()
        ''')
    py = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=300)
    assert py.returncode == r.returncode == -signal.SIGINT, r.stderr[-2000:]
    tail = py.stderr[py.stderr.index("Traceback"):]
    assert tail.endswith("KeyboardInterrupt\n"), py.stderr
    assert tail in r.stderr and "_handle" not in r.stderr, r.stderr


def test_a_script_that_ends_with_os_exit_leaves_its_profile(tmp_path):
    """`os._exit(5)` at the end of a script (to skip a slow or hanging teardown) ended the
    process with no profile and no word. Now the block is left first: the profile saved, one
    line on stderr, the status the script gave; a child it forks and ends with os._exit (as
    multiprocessing's do) saves nothing."""
    r, script = run(tmp_path, '''
        import os, torch
        model = torch.nn.Linear(8, 8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        pid = os.fork()
        if pid == 0:
            os._exit(0)            # the child: nothing of memprof's to do
        os.waitpid(pid, 0)
        print("trained", flush=True)
        os._exit(5)
        ''')
    assert r.returncode == 5, r.stderr
    assert r.stdout == "trained\n"   # no report: the process ends at os._exit
    assert r.stderr.count("memprof: os._exit(5) ended the block; profile saved to") == 1
    assert "os._exit(0)" not in r.stderr
    prof = memprof_pkg.load(str(tmp_path / "train.memprof"))
    assert len(prof.steps) - prof.partial_last_step == 5


def test_os_exit_from_another_thread_ends_the_process_at_once(tmp_path):
    """A watchdog's `threading.Timer(..., os._exit, (7,))` while the loop is stuck: leaving
    the block from that thread could wait on what the loop waits on (a hung collective), so
    the process ends at once, as under python - the autosave is what keeps a profile then."""
    r, script = run(tmp_path, '''
        import os, threading, time, torch
        torch.ones(8).sum()
        threading.Timer(0.2, os._exit, (7,)).start()
        time.sleep(30)             # the stuck loop
        ''')
    assert r.returncode == 7, r.stderr
    assert "ended the block" not in r.stderr


def test_an_error_in_backward_has_pythons_frames_without_memprofs_wrapper(tmp_path):
    """An error raised in backward went through memprof's backward wrapper, whose frame
    (`memprof/record/steps.py, in backward`) sat between the script's and torch's."""
    r, script = run(tmp_path, '''
        import torch

        class Bad(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x * 2

            @staticmethod
            def backward(ctx, g):
                raise ValueError("bad gradient")

        model = torch.nn.Linear(3, 3)
        Bad.apply(model(torch.ones(3))).sum().backward()
        ''')
    py = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=300)
    assert r.returncode == py.returncode == 1

    def frames(err):
        return [line for line in err.splitlines() if line.startswith('  File "')]
    assert frames(r.stderr) == frames(py.stderr) and len(frames(py.stderr)) >= 3, r.stderr


HOOKED = '''
    import sys
    def hook(kind, value, tb):
        print(f"[my-logger] fatal {kind.__name__}: {value} "
              f"from {tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}", file=sys.stderr)
    sys.excepthook = hook
    raise ValueError("bad config")
'''


def test_the_scripts_own_excepthook_reports_its_uncaught_exception(tmp_path):
    """rich.traceback.install(), loguru and crash reporters set sys.excepthook: Python calls it
    for an uncaught exception, with the script's frames (memprof printed its own traceback)."""
    r, script = run(tmp_path, HOOKED)
    py = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=120)
    assert py.returncode == r.returncode == 1
    assert "[my-logger] fatal ValueError: bad config from train.py" in py.stderr
    assert "[my-logger] fatal ValueError: bad config from train.py" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_import_path_is_pythons(tmp_path):
    """The launcher's first entry stayed behind the script's directory (the console script's
    `.venv/bin`, or the directory `python -m memprof.cli` ran from)."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "show.py").write_text("import sys\nprint(sys.path)\n")
    memprof_exe = os.path.join(os.path.dirname(sys.executable), "memprof")
    plain = subprocess.run([sys.executable, "sub/show.py"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    runs = [[sys.executable, "-m", "memprof.cli", "run", "sub/show.py"]]
    if os.path.exists(memprof_exe):
        runs.append([memprof_exe, "run", "sub/show.py"])
    for cmd in runs:
        tracked = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True,
                                 timeout=300)
        assert tracked.returncode == 0, tracked.stderr
        assert tracked.stdout.splitlines()[0] == plain.stdout.splitlines()[0], cmd


def test_a_zipapp_runs_as_python_runs_it(tmp_path):
    """`memprof run app.zip` read the archive as source: "source code string cannot contain
    null bytes"; a __main__.py in latin-1 (its coding line) is read as python reads it."""
    import zipapp
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "helper.py").write_text("WHAT = 'helper from the archive'\n")
    (tmp_path / "app" / "__main__.py").write_bytes(
        "# -*- coding: latin-1 -*-\nimport sys, helper\n"
        "print(sys.argv, helper.WHAT, __name__, 'caf\u00e9')\n".encode("latin-1"))
    zipapp.create_archive(tmp_path / "app", tmp_path / "app.pyz")
    plain, tracked = _both(tmp_path, "app.pyz", "1")
    assert plain.returncode == 0 and tracked.returncode == 0, tracked.stderr
    assert tracked.stdout.splitlines()[0] == plain.stdout.splitlines()[0]
    assert (tmp_path / "app.memprof").exists()


def test_a_ctrl_c_inside_backward_shows_no_memprof_wrapper_frame(tmp_path):
    """Once the signal handler's frame was left out, memprof's wrappers between the user's
    frames (record/steps.py's `backward`) were not: they are not in Python's traceback."""
    r, script = run(tmp_path, '''
        import os, signal, time, torch

        class Slow(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x * 2

            @staticmethod
            def backward(ctx, g):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(30)
                return g * 2

        x = torch.randn(4, requires_grad=True)
        Slow.apply(x).sum().backward()
        ''')
    assert r.returncode == -signal.SIGINT, r.stderr[-2000:]
    assert "in backward" in r.stderr and "KeyboardInterrupt" in r.stderr
    assert "memprof" not in r.stderr.split("Traceback")[1].split("KeyboardInterrupt")[0], \
        r.stderr


def test_a_training_thread_that_tracks_itself_runs_as_under_python(tmp_path):
    """A script whose worker thread opens `memprof.track(model)` failed only under memprof
    run ("thread 'trainer' cannot start a block while thread 'MainThread' is recording"): the
    run's own block is no block of the script's. Its profile is python's, and a second
    thread's block while the first is open is refused under both."""
    source = '''
        import threading, torch, memprof
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        inside, leave, out = threading.Event(), threading.Event(), {}
        def train():
            try:
                with memprof.track(model, opt) as prof:
                    for _ in range(4):
                        model(torch.randn(32, 64)).square().mean().backward()
                        opt.step()
                        opt.zero_grad()
                    inside.set()
                    leave.wait()
                out["prof"] = prof
            finally:
                inside.set()   # a refused block must not leave the main thread waiting
        def second():
            try:
                with memprof.track():
                    pass
            except RuntimeError as err:
                out["refused"] = str(err).split(" (")[0]
        t = threading.Thread(target=train, name="trainer")
        t.start()
        inside.wait()
        s = threading.Thread(target=second, name="second")
        s.start()
        s.join()
        leave.set()
        t.join()
        p = out["prof"]
        print("steps", len(p.steps), "peak", p.peak, "model", p.meta["model_class"])
        print("refused:", out.get("refused"))
        '''
    r, script = run(tmp_path, source)
    assert r.returncode == 0, r.stderr
    alone = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr
    said = alone.stdout.splitlines()
    assert said[0].startswith("steps 4 peak ") and said[0].endswith("model Sequential"), said
    assert said[1] == ("refused: memprof.track: thread 'second' cannot start a block while "
                       "thread 'trainer' is recording"), said
    assert r.stdout.splitlines()[:2] == said


def test_a_warning_between_backward_and_the_update_names_the_scripts_line(tmp_path):
    """torch's own warnings from the script's lines between a backward and the next forward
    (`float(loss)` on a tensor that requires grad, beside a hand-written update) were
    attributed to memprof's update watch: a `-W error::UserWarning:__main__` filter that ends
    the script under python let it run on under memprof, and the warning named memprof's file."""
    source = '''
        import torch
        import torch.nn.functional as F
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        for step in range(3):
            model.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            value = float(loss)
        print("done", step)
        '''
    r, script = run(tmp_path, source)
    alone = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert r.returncode == alone.returncode == 0, r.stderr
    said = [line for line in alone.stderr.splitlines() if "UserWarning" in line]
    assert said and said[0].startswith(f"{script}:14: UserWarning"), alone.stderr
    assert [line for line in r.stderr.splitlines() if "UserWarning" in line] == said
    env = dict(os.environ, PYTHONWARNINGS="error::UserWarning:__main__")
    strict = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    under = subprocess.run([sys.executable, "-m", "memprof.cli", "run", str(script)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert strict.returncode == under.returncode == 1, under.stderr
    trace = strict.stderr[strict.stderr.index("Traceback"):]
    assert trace in under.stderr, (trace, under.stderr)   # the same frames, none of memprof's


def test_a_tracking_daemon_thread_left_unjoined_is_said_not_silently_cut(tmp_path):
    """memprof run's block ends when the script's main code returns (python does not wait for
    a daemon thread either); a daemon thread's block still open then had its events taken
    with it and ended silently."""
    r, _ = run(tmp_path, '''
        import threading, time, torch, memprof
        model = torch.nn.Linear(8, 8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        started = threading.Event()
        def work():
            with memprof.track(model, opt):
                started.set()
                for _ in range(20):
                    model(torch.randn(4, 8)).sum().backward()
                    opt.step()
                    opt.zero_grad()
                    time.sleep(0.05)
        threading.Thread(target=work, name="trainer", daemon=True).start()
        started.wait()
        ''')
    flat = " ".join(r.stderr.split())
    assert "thread 'trainer' still has a memprof.track() block open as the run ends" in flat
    assert "join the thread before the script ends" in flat


def test_a_run_that_records_nothing_keeps_the_profile_of_the_run_before(tmp_path):
    """`memprof run train.py --help` (or a typo its argparse refuses) after a long run
    replaced that run's profile with an empty one."""
    source = '''
        import argparse, torch
        parser = argparse.ArgumentParser()
        parser.add_argument("--epochs", type=int, default=1)
        args = parser.parse_args()
        model = torch.nn.Linear(8, 8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3 * args.epochs):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        '''
    r, script = run(tmp_path, source)
    assert r.returncode == 0, r.stderr
    saved = (tmp_path / "train.memprof").read_bytes()
    for args, status in ((["--epochs", "x"], 2), (["--help"], 0)):
        again = subprocess.run([sys.executable, "-m", "memprof.cli", "run", str(script), *args],
                               cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert again.returncode == status, again.stderr
        assert "memprof: nothing was recorded (the script " in again.stderr
        assert status == 0 or f"exited with status {status} before allocating" in again.stderr
        assert (tmp_path / "train.memprof").read_bytes() == saved


def test_the_scripts_threads_are_waited_for_as_python_waits(tmp_path):
    """python waits for the script's non-daemon threads before it ends; memprof run ended its
    block when the main code returned, so a run that trains in a thread it did not join read
    1 step and 4 events. A pool's workers (a ThreadPoolExecutor left open) end as python ends
    them, and an uncaught error is shown before the wait, as python shows it."""
    r, _ = run(tmp_path, '''
        import threading, time, torch
        from concurrent.futures import ThreadPoolExecutor
        def train():
            model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                        torch.nn.Linear(256, 10))
            opt = torch.optim.AdamW(model.parameters())
            for _ in range(30):
                model(torch.randn(32, 64)).square().mean().backward()
                opt.step()
                opt.zero_grad()
                time.sleep(0.005)
            print("trained 30 steps", flush=True)
        pool = ThreadPoolExecutor(2)
        pool.submit(time.sleep, 0.01)
        threading.Thread(target=train).start()
        print("main returns", flush=True)
        ''', before=("--json",))
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert len(summary["steps"]) == 30, len(summary["steps"])
    assert r.stderr.index("main returns") < r.stderr.index("trained 30 steps")

    r, _ = run(tmp_path, '''
        import threading, time
        def later():
            time.sleep(0.5)
            print("thread done", flush=True)
        threading.Thread(target=later).start()
        raise ValueError("main failed")
        ''')
    assert r.returncode == 1
    assert "ValueError: main failed" in r.stderr and "thread done" in r.stdout


def test_a_process_pool_left_open_does_not_hang_the_run(tmp_path):
    """python ends a ProcessPoolExecutor left open through threading's exit hooks, before it
    waits for the threads; memprof run waited for the pool's manager thread itself, which only
    ends after those hooks: the run hung after the script's last line."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent('''
        import torch
        from concurrent.futures import ProcessPoolExecutor

        def square(v):
            return v * v

        if __name__ == "__main__":
            pool = ProcessPoolExecutor(max_workers=1)
            print(list(pool.map(square, range(4))), flush=True)
            model = torch.nn.Linear(8, 8)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(3):
                model(torch.randn(4, 8)).sum().backward()
                opt.step()
                opt.zero_grad()
        '''))
    try:
        r = subprocess.run([sys.executable, "-m", "memprof.cli", "run", str(script)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("memprof run hung on a ProcessPoolExecutor left open") from None
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[0, 1, 4, 9]" in r.stderr + r.stdout and "profile saved to train.memprof" in r.stdout
