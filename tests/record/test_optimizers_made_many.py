"""`memprof run --health` (no optimizer given) notes every optimizer the script makes until the
loop's first step, to read the first step's LRs. Each one made scanned every one noted before,
dead ones too, and the noting went on after the first step: a script that makes an optimizer
per iteration (MAML-style inner loops) slowed quadratically (40k optimizers: 29 s against
~0.06 s without health). The table drops the freed ones, and noting stops once the loop's
optimizer has stepped."""
import gc

import pytest
import torch

import memprof

pytestmark = pytest.mark.usefixtures("collect_garbage_after")


def _health(tracker):
    return next(r for r in tracker.session.recorders if r.name == "health")


def test_freed_optimizers_leave_the_table_before_the_first_step():
    model = torch.nn.Linear(4, 4)
    tracker = memprof.track(model, health=True, analyses=())
    with tracker:
        made = _health(tracker)._made
        for _ in range(500):   # each freed at once (no cycle): its entry goes with it
            torch.optim.SGD(model.parameters(), lr=0.1)
        gc.collect()
        assert len(made._refs) <= 1, len(made._refs)
        kept = torch.optim.SGD(model.parameters(), lr=0.1)
        assert made.alive() == [kept]


def test_noting_stops_after_the_first_step():
    model = torch.nn.Linear(4, 4)
    tracker = memprof.track(model, health=True, analyses=())
    with tracker:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        assert _health(tracker)._made is None
        others = [torch.optim.SGD(model.parameters(), lr=0.1) for _ in range(50)]
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    assert len(tracker.profile.steps) == 2
    assert len(others) == 50
