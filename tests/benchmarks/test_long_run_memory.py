"""benchmarks/long_run_memory.py measures what a real tracked run keeps in Python per step,
while its log records and once it is full, in fresh processes."""
from benchmark_scripts import run_script


def test_a_small_run_prints_and_saves_its_rows(tmp_path):
    stdout, payload, table = run_script("long_run_memory", tmp_path / "long_run_memory",
                                        "--layers", "4", "--steps", "100")
    assert "Python B/step" in stdout and "dropped" in stdout
    recording, full = payload["rows"]
    assert recording["params"] == full["params"] == 8
    assert not recording["full"] and recording["dropped"] == 0
    assert full["full"] and full["dropped"] > 0
    assert recording["events_per_step"] > 0 and recording["step_us"] > 0
    # once the log is full no snapshot is kept: less per step than while it records
    assert full["python_bytes_per_step"] < recording["python_bytes_per_step"]
    assert table.startswith("memprof's Python memory")
