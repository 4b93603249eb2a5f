"""benchmarks/autosave_cost.py measures a real save: the second save of a block, its memory and
the block's exit, per event count, from fresh processes."""
import json
import subprocess
import sys

from benchmark_scripts import BENCHMARKS


def test_a_small_run_prints_and_saves_its_row(tmp_path):
    out = tmp_path / "autosave_cost"
    r = subprocess.run([sys.executable, f"{BENCHMARKS}/autosave_cost.py", "--events", "5000",
                        "--rounds", "1", "--out", str(out)], capture_output=True, text=True,
                       cwd=BENCHMARKS, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "save s" in r.stdout and "leaving s" in r.stdout
    (row,) = json.loads((tmp_path / "autosave_cost.json").read_text())["rows"]
    assert row["events"] >= 5000 and row["runs"][0]["steps"] > 0
    assert row["save_s"] > 0 and row["first_save_s"] > 0 and row["file_mib"] > 0
    assert (tmp_path / "autosave_cost.txt").read_text().startswith("autosave cost")
