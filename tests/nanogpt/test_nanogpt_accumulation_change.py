"""Gradient accumulation that changes mid-run (4 micro-steps, then 8: the loss divided by each
step's own count). The health table read the divided loss for every step - "first 1.043, last
0.521", a loss that seemed to halve when the accumulation doubled - and "warmup 3 optimizer
steps = 18 micro-steps at 6 per optimizer step", a count no step had."""
import math

import pytest

import memprof
import nanogpt_train
from rich.console import Console


def _run(tmp_path, *argv):
    args = nanogpt_train.parse(["--out-dir", str(tmp_path / "out"), *argv])
    model, opt = nanogpt_train.build()
    with memprof.track(model, optimizer=opt, health=True) as prof:
        nanogpt_train.train(model, opt, args)
    return prof


@pytest.fixture(scope="module")
def changed(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("changed"), "--bug", "accum_change")


def test_the_loss_is_the_models_before_and_after_the_change(changed):
    prof = changed
    losses = prof.health["per_step"]["loss"]
    # random tokens over 65 characters: ln 65 = 4.17 at every step, whatever the accumulation
    assert all(abs(x - math.log(65)) < 0.1 for x in losses), losses
    assert "times 4 and 8" in prof.health["loss_source"], prof.health["loss_source"]
    lr = prof.health["lr"]
    assert lr["warmup_optimizer_steps"] == 3 and lr["warmup_micro_steps"] == 12, lr
    con = Console(record=True, width=200)
    prof.report(console=con)
    text = con.export_text()
    assert "warmup 3 optimizer steps = 12 micro-steps" in text, text


def test_an_effective_batch_that_doubled_under_the_same_lr_is_named(changed, tmp_path):
    """seeds/003: the effective batch grew (8 -> 128) and the LR did not follow it. Here the
    accumulation doubles at step 6 and the cosine schedule goes on as before: said, with the
    step, both effective batches and the LR's change; the clean run has no such finding."""
    prof = changed
    found = [f for f in prof.findings if f.kind == "effective_batch_changed"]
    assert len(found) == 1, [f.kind for f in prof.findings]
    f = found[0]
    assert f.severity == "warning"
    assert f.evidence["step"] == 6
    assert f.evidence["samples_before"] == 16 and f.evidence["samples_after"] == 32
    assert f.evidence["micro_steps_before"] == 4 and f.evidence["micro_steps_after"] == 8
    assert "effective batch 16 -> 32" in f.message and "step 6" in f.message, f.message
    # (the clean loop: test_nanogpt_lr_per_micro_step.py, no finding at all)
    rescaled = _run(tmp_path, "--bug", "accum_change_rescaled", "--max-iters", "8")
    assert not [f for f in rescaled.findings if f.kind == "effective_batch_changed"]


def test_half_the_micro_batch_at_twice_the_accumulation_is_no_change(tmp_path):
    """seeds/001: micro-batch 8 -> 4, accumulation 2 -> 4, the effective batch kept: the
    micro-steps doubled but the samples per optimizer step did not."""
    prof = _run(tmp_path, "--bug", "accum_change_same_batch", "--max-iters", "8")
    assert not [f for f in prof.findings if f.kind == "effective_batch_changed"]
    assert all(abs(x - math.log(65)) < 0.1 for x in prof.health["per_step"]["loss"])


def test_held_runs_of_a_drifting_batch_are_no_change():
    """Batches that vary (token-based, sorted by length) are no schedule of changes: neither
    a drift by a few samples nor many held sizes; a doubling held on both sides is one."""
    from memprof.analyse.batch_change import _changes
    assert _changes([30, 30, 30, 32, 32, 32, 34, 34, 34]) == []
    assert _changes([8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]) == []
    # an epoch's short last step (4 samples) is no change; the doubling after it is
    sizes = [16] * 6 + [4] + [16] * 5 + [32] * 6
    assert _changes(sizes) == [(list(range(7, 12)), list(range(12, 18)))]
