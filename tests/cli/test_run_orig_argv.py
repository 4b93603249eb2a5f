"""sys.orig_argv under `memprof run` reads as python's for the same script and arguments: a
script that re-launches itself from it (a watchdog restarting the run, a job resubmitted with
`sys.orig_argv`) read memprof's command line (`-m memprof.cli run --json ...`) instead; the
interpreter options really given (`-X utf8`, `-u`) stay, memprof's own options do not."""
import os
import subprocess
import sys
import textwrap

SHOWS = '''
import sys
print("orig", sys.orig_argv[1:])
'''


def _pair(tmp_path, options, target, args, memprof_options=()):
    plain = subprocess.run([sys.executable, *options, *target, *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    tracked = subprocess.run([sys.executable, *options, "-m", "memprof.cli", "run",
                              *memprof_options, *target, *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and tracked.returncode == 0, tracked.stderr
    mine = [line for line in plain.stdout.splitlines() if line.startswith("orig")]
    theirs = [line for line in (tracked.stdout + tracked.stderr).splitlines()
              if line.startswith("orig")]   # (--json: the script's output is on stderr)
    return mine, theirs


def test_orig_argv_is_pythons_for_a_script_and_a_module(tmp_path):
    (tmp_path / "train.py").write_text(textwrap.dedent(SHOWS))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "train.py").write_text(textwrap.dedent(SHOWS))
    cases = [(["-X", "utf8", "-u"], ["train.py"], ["--epochs", "1", "-o", "x"], ["--json"]),
             ([], ["-m", "pkg.train"], ["a", "--", "b"], ["-o", "m.memprof"])]
    for options, target, args, memprof_options in cases:
        plain, tracked = _pair(tmp_path, options, target, args, memprof_options)
        assert plain == [f"orig {options + target + args}"], plain
        assert tracked == plain, (target, tracked)


def test_orig_argv_from_the_console_script(tmp_path):
    """`memprof run train.py x` (the console script, python behind its #! line): the script
    reads `[python, 'train.py', 'x']`, as `python train.py x` gives it."""
    (tmp_path / "train.py").write_text(textwrap.dedent(SHOWS))
    console = os.path.join(os.path.dirname(sys.executable), "memprof")
    tracked = subprocess.run([console, "run", "train.py", "x"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert tracked.returncode == 0, tracked.stderr
    assert tracked.stdout.splitlines()[0] == "orig ['train.py', 'x']", tracked.stdout
