"""Gradient accumulation that changes mid-run (4 micro-steps, then 8: the loss divided by each
step's own count). The health table read the divided loss for every step - "first 1.043, last
0.521", a loss that seemed to halve when the accumulation doubled - and "warmup 3 optimizer
steps = 18 micro-steps at 6 per optimizer step", a count no step had."""
import math

import memprof
import nanogpt_train
from rich.console import Console


def _run(tmp_path, *argv):
    args = nanogpt_train.parse(["--out-dir", str(tmp_path / "out"), *argv])
    model, opt = nanogpt_train.build()
    with memprof.track(model, optimizer=opt, health=True) as prof:
        nanogpt_train.train(model, opt, args)
    return prof


def test_the_loss_is_the_models_before_and_after_the_change(tmp_path):
    prof = _run(tmp_path, "--bug", "accum_change")
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
