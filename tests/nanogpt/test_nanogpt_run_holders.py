"""`memprof run` on the nanoGPT script with one seeds' leak at a time: each named with its
holder. The attention maps kept undetached in every block (seeds/000's `sa_attention_history`)
were named `model.blocks.0.attn.history` for the first block but
`train.<locals>.b.attn.history` for the second - the loop variable that set the lists up
(`for b in model.blocks: b.attn.history = []`) was left pointing at it, a shorter path than
the model's."""
import json
import subprocess
import sys
from pathlib import Path

import nanogpt_train

SCRIPT = Path(nanogpt_train.__file__)


def _run(tmp_path, *argv):
    r = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--json", "--health",
                        str(SCRIPT), "--out-dir", str(tmp_path / "out"), *argv],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["findings"]


def test_attention_maps_kept_in_each_block_are_named_by_the_model(tmp_path):
    found = _run(tmp_path, "--bug", "attn_history")
    holders = sorted(f["holder"] for f in found if f["kind"] == "retained_graph")
    assert holders == ["model.blocks.0.attn.history", "model.blocks.1.attn.history"], found


def test_losses_kept_for_logging_are_named_and_the_clean_script_has_none(tmp_path):
    found = _run(tmp_path, "--bug", "keep_loss")
    assert [(f["kind"], f["holder"]) for f in found if f["severity"] == "error"] == [
        ("retained_graph", "train.<locals>.lossi")], found
    assert _run(tmp_path) == []


def test_the_scripts_own_block_finds_the_kept_losses_under_memprof_run_as_under_python(
        tmp_path):
    """The loop in a function that returns inside the script's `with memprof.track(...)`:
    under python the block named `train.<locals>.lossi`; under `memprof run` the same block's
    findings were empty (its leak looks were the outer block's, which it never read)."""
    argv = [str(SCRIPT), "--out-dir", str(tmp_path / "out"), "--track", "--bug", "keep_loss"]
    want = "FINDINGS [('retained_graph', 'train.<locals>.lossi')]"
    plain = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    assert want in plain.stdout, plain.stdout[-2000:]
    run = subprocess.run([sys.executable, "-m", "memprof.cli", "run", *argv], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert want in run.stdout, run.stdout[-3000:]
