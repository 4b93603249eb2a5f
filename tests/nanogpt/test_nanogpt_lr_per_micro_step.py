"""The LR set by hand on each param_group (nanoGPT's get_lr) under gradient accumulation.
Counted in micro-steps (seeds/004: "warmup should be counted in gradient updates"), the
schedule ends `accum` times too early and the LR then sits at its floor: the LR changed inside
3 of 12 optimizer steps, under the half of all steps the rule asked for, so no finding. And the
correct loop that evaluates at the top of every iteration, before setting that step's LR,
read "the learning rate changed between the micro-steps of 11 of 12 optimizer steps": the
evaluation's forward passes (no backward) counted as micro-steps."""
import torch

import memprof
from memprof.analyse.throughput import TIMING_KINDS
import nanogpt_train


def _kinds(tmp_path, *argv):
    args = nanogpt_train.parse(["--out-dir", str(tmp_path / "out"), *argv])
    model, opt = nanogpt_train.build()
    with memprof.track(model, optimizer=opt, health=True) as prof:
        nanogpt_train.train(model, opt, args)
    # (not the findings read from the wall clock: the machine's load moves them)
    return [f.kind for f in memprof.findings(prof, "info") if f.kind not in TIMING_KINDS], prof


def test_warmup_counted_in_micro_steps_is_named(tmp_path):
    kinds, prof = _kinds(tmp_path, "--bug", "warmup_micro")
    assert "lr_schedule_per_micro_step" in kinds, kinds
    f = next(f for f in prof.findings if f.kind == "lr_schedule_per_micro_step")
    assert f.severity == "warning"


def test_an_evaluation_before_each_steps_lr_is_no_lr_change(tmp_path):
    kinds, _ = _kinds(tmp_path, "--eval-interval", "1")
    assert "lr_schedule_per_micro_step" not in kinds, kinds


def test_the_clean_loop_has_no_finding(tmp_path):
    kinds, _ = _kinds(tmp_path)
    assert kinds == [], kinds


def test_memprof_run_health_names_it_in_an_unmodified_script(tmp_path):
    """The same through `memprof run --health`, whose block learns the optimizer at its first
    step (its LRs before that are read from the optimizers the script made): 16 optimizer
    steps."""
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--json", "--health",
                        nanogpt_train.__file__, "--out-dir", str(tmp_path / "out"),
                        "--max-iters", "16", "--bug", "warmup_micro"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    found = [f for f in json.loads(r.stdout)["findings"]
             if f["kind"] == "lr_schedule_per_micro_step"]
    assert len(found) == 1 and "ends 4x too early" in found[0]["message"], found


def test_a_per_epoch_scheduler_with_epochs_ending_inside_windows_is_no_micro_step_schedule():
    """StepLR stepped once per epoch, 9 batches an epoch at 4 micro-steps: each epoch's end
    falls inside an accumulation window, one LR change there - no per-micro-batch schedule
    (the rule read 4 such windows of 5 in which the LR moved as one)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    accum, k = 4, 0
    with memprof.track(model, opt, health=True) as prof:
        for _ in range(5):
            for _ in range(9):
                (model(torch.randn(8, 16)).pow(2).mean() / accum).backward()
                k += 1
                if k % accum == 0:
                    opt.step()
                    opt.zero_grad()
            sched.step()
    assert not [f for f in prof.findings if f.kind == "lr_schedule_per_micro_step"], \
        [f.message for f in prof.findings]
