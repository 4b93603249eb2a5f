"""How the `memprof` command ends: after memprof's own work without Python's finalization
(about 1 s of torch, dynamo and sympy teardown), with atexit handlers run and output flushed;
after user code, with another non-daemon thread alive or under a profiler, as Python ends."""
import subprocess
import sys

# an object whose __del__ runs only in Python's finalization (a module global)
PROBE = '''
import atexit, sys, threading, time
atexit.register(lambda: print("atexit ran", flush=True))

class Finalized:
    def __del__(self):
        print("finalized", flush=True)

kept = Finalized()
from memprof.cli import console_main
if "thread" in sys.argv[1:]:
    # alive until Python's exit begins (what Python waits for at exit: non-daemon threads)
    sys.argv.remove("thread")
    done = threading.Event()
    threading._register_atexit(done.set)
    threading.Thread(target=done.wait, args=(60,)).start()
if "daemon" in sys.argv[1:]:
    sys.argv.remove("daemon")
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
if "profiled" in sys.argv[1:]:
    sys.argv.remove("profiled")
    sys.setprofile(lambda frame, event, arg: None)
try:
    console_main()
finally:           # what a profiler does after main: cProfile writes its stats here
    print("after main", flush=True)
'''


def _probe(tmp_path, *args):
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return subprocess.run([sys.executable, str(path), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_memprof_command_leaves_without_finalization(tmp_path):
    r = _probe(tmp_path, "gpus")
    assert r.returncode == 0, r.stderr
    assert "v100-16gb" in r.stdout and "TFLOP/s" in r.stdout   # the whole table came out
    assert r.stdout.rstrip().endswith("atexit ran")             # atexit handlers ran last
    assert "finalized" not in r.stdout and "after main" not in r.stdout   # no finalization


def test_exit_status_kept(tmp_path):
    r = _probe(tmp_path, "report", str(tmp_path / "missing.memprof"))
    assert r.returncode == 2
    assert "missing.memprof" in r.stderr
    assert "atexit ran" in r.stdout and "finalized" not in r.stdout


def test_a_daemon_thread_does_not_hold_the_exit(tmp_path):
    r = _probe(tmp_path, "gpus", "daemon")
    assert r.returncode == 0, r.stderr
    assert "atexit ran" in r.stdout and "finalized" not in r.stdout


def test_under_a_profiler_ends_as_python_ends(tmp_path):
    r = _probe(tmp_path, "gpus", "profiled")
    assert r.returncode == 0, r.stderr
    assert "v100-16gb" in r.stdout and "after main" in r.stdout


def test_which_commands_leave_fast():
    from memprof.cli import build_parser
    p = build_parser()

    def fast(*argv):
        args = p.parse_args(list(argv))
        return args.command_object.leaves_fast(args)
    assert fast("gpus") and fast("report", "x.memprof") and fast("demo")
    assert fast("recommend", "--gpu", "v100-16gb", "--model", "dcal-vit-b16")
    assert not fast("recommend", "--gpu", "v100-16gb", "--model", "mymodels:build")
    assert not fast("recommend", "--gpu", "v100-16gb", "--model", "dcal-vit-b16",
                    "--batch-fn", "mymodels:batch")
    assert not fast("run", "train.py")


def test_another_thread_alive_ends_as_python_ends(tmp_path):
    r = _probe(tmp_path, "gpus", "thread")
    assert r.returncode == 0, r.stderr
    assert "v100-16gb" in r.stdout and "atexit ran" in r.stdout
    assert "finalized" in r.stdout


def test_user_script_ends_as_python_ends(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("class F:\n    def __del__(self):\n        print('script finalized')\n"
                      "kept = F()\n")
    r = _probe(tmp_path, "run", "-o", str(tmp_path / "run.memprof"), str(script))
    assert r.returncode == 0, r.stderr
    assert "script finalized" in r.stdout and "finalized" in r.stdout.replace(
        "script finalized", "", 1)
