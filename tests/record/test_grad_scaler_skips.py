"""A `GradScaler.step(optimizer)` that skips the update (inf/NaN gradients: every fp16 run's
first steps while the scale settles) ends the iteration's step, noted as skipped. Before, no
boundary: the next iteration's work was folded into the same step (2 micro-steps, two losses
averaged, twice the allocations) and a warmup scheduler stepped per iteration read as "the LR
changed between the micro-steps" (a false warning on a correct AMP loop)."""
import pytest
import torch
from torch import nn

import memprof

pytestmark = pytest.mark.usefixtures("collect_garbage_after")

SKIPPED = (0, 5)


def _amp_loop(iterations=10):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    scaler = torch.amp.GradScaler("cpu")
    updated = []
    with memprof.track(model, opt, health=True) as prof:
        for i in range(iterations):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(torch.randn(16, 32)).float(),
                                                   torch.randint(0, 10, (16,)))
            scaler.scale(loss).backward()
            if i in SKIPPED:   # an overflow, as fp16 has now and then
                model[0].weight.grad[0, 0] = float("inf")
            before = model[0].weight.detach().clone()
            scaler.step(opt)
            scaler.update()
            updated.append(not torch.equal(before, model[0].weight))
            sched.step()
            opt.zero_grad(set_to_none=True)
    return prof, updated


def test_a_skipped_update_ends_its_iterations_step_and_is_said():
    prof, updated = _amp_loop()
    assert [i for i, u in enumerate(updated) if not u] == list(SKIPPED)   # the scaler skipped
    assert len(prof.steps) == 10
    assert prof.health["skipped_by_grad_scaler"] == list(SKIPPED)
    assert prof.throughput["micro_steps_range"] == [1, 1]
    kinds = [f.kind for f in memprof.findings(prof)]
    assert "lr_schedule_per_micro_step" not in kinds, kinds
