"""A script that replaces sys.stdout (a tee to a log file, or the log file alone) keeps its log
as python writes it: memprof's report goes to the stdout the run started with (it was
written into the user's log file, and with --json the document went there too)."""
import json
import subprocess
import sys
import textwrap

SCRIPT = '''
import sys
import torch

class Tee:
    def __init__(self, path):
        self.log, self.terminal = open(path, "w"), sys.stdout

    def write(self, text):
        self.log.write(text)
        self.terminal.write(text)

    def flush(self):
        self.log.flush()
        self.terminal.flush()

sys.stdout = Tee("log.txt") if sys.argv[1] == "tee" else open("log.txt", "w")
model = torch.nn.Linear(8, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(3):
    loss = model(torch.randn(4, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    print("step", step)
'''


def _both(tmp_path, how, *memprof_options):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    python = subprocess.run([sys.executable, str(script), how], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    python_log = (tmp_path / "log.txt").read_text()
    memprof = subprocess.run([sys.executable, "-m", "memprof.cli", "run", *memprof_options,
                              str(script), how], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    return python, python_log, memprof, (tmp_path / "log.txt").read_text()


def test_a_tee_to_a_log_file_keeps_the_report_out_of_the_log(tmp_path):
    python, python_log, memprof, memprof_log = _both(tmp_path, "tee")
    assert python_log == "step 0\nstep 1\nstep 2\n" and python.stdout == python_log
    assert memprof.returncode == 0, memprof.stderr
    assert memprof_log == python_log
    assert memprof.stdout.startswith(python_log)   # the script's lines first, then the report
    assert "Alive at the peak" in memprof.stdout and "profile saved to" in memprof.stdout


def test_stdout_replaced_by_a_file_leaves_the_json_document_on_stdout(tmp_path):
    python, python_log, memprof, memprof_log = _both(tmp_path, "file", "--json")
    assert python.stdout == "" and python_log == "step 0\nstep 1\nstep 2\n"
    assert memprof.returncode == 0, memprof.stderr
    assert memprof_log == python_log
    assert len(json.loads(memprof.stdout)["steps"]) == 3


def test_stdout_closed_by_the_script_still_gets_the_report(tmp_path):
    """`sys.stdout.close()` at the script's end: python exits 0; the report failed with
    'memprof run: I/O operation on closed file.' and exit status 2."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent('''
        import sys
        import torch
        model = torch.nn.Linear(8, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        print("done")
        sys.stdout.close()
    '''))
    python = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    memprof = subprocess.run([sys.executable, "-m", "memprof.cli", "run", str(script)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert python.returncode == 0 and python.stdout == "done\n"
    assert memprof.returncode == 0, memprof.stderr
    assert memprof.stdout.startswith("done\n") and "profile saved to" in memprof.stdout
    assert memprof.stderr == ""
