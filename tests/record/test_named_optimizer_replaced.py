"""`track(model, optimizer=opt)` held the optimizer strongly: a script that replaced it (a new
optimizer after `model.to(torch.float64)`, a new schedule phase) kept the old one and its state
alive only because memprof held it, reported that dead state as the run's optimizer state, and
counted no step of the new optimizer (10 steps read "5 + partial")."""
import gc
import weakref

import torch

import memprof


def test_a_replaced_optimizer_is_freed_and_the_new_ones_steps_count():
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.Adam(model.parameters())
    with memprof.track(model, opt) as prof:
        for step in range(6):
            if step == 3:   # the script switches precision and makes a new optimizer
                old = weakref.ref(opt)
                model.to(torch.float64)
                opt = torch.optim.Adam(model.parameters())
                gc.collect()
                assert old() is None   # nothing but the script held it, as without memprof
            x = torch.randn(8, 256, dtype=next(model.parameters()).dtype)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert len(prof.steps) == 6 and not prof.partial_last_step
    at_end = prof.breakdown("category", at="end")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # the new optimizer's two Adam moments (fp64) and its step counters, not the old one's
    # state (fp32, freed)
    assert at_end["parameters"] == params
    assert 2 * params <= at_end["optimizer_state"] <= 2 * params + 64
    assert at_end["other"] < params // 4
