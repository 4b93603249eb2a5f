"""torch's "lr_scheduler.step() before optimizer.step()" warning names the user's line under
track(health=True), as without memprof: the wrapper of the scheduler's step took its frame
(memprof's record/health.py), and a filter on the user's module no longer matched."""
import warnings

import torch

import memprof


def test_the_order_warning_points_at_the_users_call():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with memprof.track(model, opt, health=True):
            sched.step(); line = sys_line()   # noqa: E702  (the line of the call)
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
    order = [w for w in caught if "before `optimizer.step()`" in str(w.message)]
    assert len(order) == 1
    assert (order[0].filename, order[0].lineno) == (__file__, line)


def sys_line() -> int:
    import sys
    return sys._getframe(1).f_lineno
