"""benchmarks/step_instructions.py counts a real step's instructions under callgrind, per mode:
the tracked step runs more of them than the untracked one, and the parts add up."""
import shutil
import subprocess
import sys

import pytest

from benchmark_scripts import BENCHMARKS, run_script

needs_valgrind = pytest.mark.skipif(
    shutil.which("valgrind") is None or shutil.which("callgrind_control") is None,
    reason="valgrind's callgrind is not installed")


@needs_valgrind
@pytest.mark.slow
def test_a_small_run_counts_each_mode_and_splits_tracks_cost(tmp_path):
    modes = "hook points only,native recording only,track(health=False)"
    stdout, payload, table = run_script("step_instructions", tmp_path / "si", "--modes", modes,
                                        "--window-a", "2", "--window-b", "5")
    per_step = payload["instructions_per_step"]
    assert list(per_step) == ["untracked", "hook points only", "native recording only",
                              "track(health=False)"]
    base = per_step["untracked"]
    assert base > 100_000   # a real training step of the twin MLP
    # each mode adds work to the one before it (its hooks and then its recording)
    assert base < per_step["hook points only"] < per_step["native recording only"] \
        < per_step["track(health=False)"]
    parts = payload["track_parts"]
    assert sum(parts.values()) == pytest.approx(per_step["track(health=False)"] - base)
    assert "track(health=False)" in table and "instructions/step" in table


def test_windows_that_reach_the_leak_probes_look_are_refused():
    r = subprocess.run([sys.executable, "step_instructions.py", "--window-a", "10",
                        "--window-b", "40"], capture_output=True, text=True, cwd=BENCHMARKS)
    assert r.returncode != 0
    assert "--window-a/--window-b" in r.stderr and len(r.stderr.strip().splitlines()) == 1
