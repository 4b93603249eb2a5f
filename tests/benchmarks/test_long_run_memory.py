"""benchmarks/long_run_memory.py measures what a real tracked run keeps in Python per step,
while its log records and once it is full, in fresh processes."""
import json
import subprocess
import sys

from benchmark_scripts import BENCHMARKS


def test_a_small_run_prints_and_saves_its_rows(tmp_path):
    out = tmp_path / "long_run_memory"
    r = subprocess.run([sys.executable, f"{BENCHMARKS}/long_run_memory.py", "--layers", "4",
                        "--steps", "100", "--out", str(out)], capture_output=True, text=True,
                       cwd=BENCHMARKS, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Python B/step" in r.stdout and "dropped" in r.stdout
    recording, full = json.loads((tmp_path / "long_run_memory.json").read_text())["rows"]
    assert recording["params"] == full["params"] == 8
    assert not recording["full"] and recording["dropped"] == 0
    assert full["full"] and full["dropped"] > 0
    assert recording["events_per_step"] > 0 and recording["step_us"] > 0
    # once the log is full no snapshot is kept: less per step than while it records
    assert full["python_bytes_per_step"] < recording["python_bytes_per_step"]
    assert (tmp_path / "long_run_memory.txt").read_text().startswith("memprof's Python memory")
