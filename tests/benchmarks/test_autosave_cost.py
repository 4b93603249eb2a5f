"""benchmarks/autosave_cost.py measures a real save: the second save of a block, its memory and
the block's exit, per event count, from fresh processes."""
from benchmark_scripts import run_script


def test_a_small_run_prints_and_saves_its_row(tmp_path):
    stdout, payload, table = run_script("autosave_cost", tmp_path / "autosave_cost",
                                        "--events", "5000", "--rounds", "1")
    assert "save s" in stdout and "leaving s" in stdout
    (row,) = payload["rows"]
    assert row["events"] >= 5000 and row["runs"][0]["steps"] > 0
    assert row["save_s"] > 0 and row["first_save_s"] > 0 and row["file_mib"] > 0
    assert table.startswith("autosave cost")
