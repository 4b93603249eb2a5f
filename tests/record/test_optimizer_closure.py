"""`optimizer.step(closure)` (LBFGS; Lightning's automatic optimisation): the forward and
backward run inside the step, so the optimizer's phase begins when the closure returns, not at
the step's pre-hook (the update's ops were labelled "other", the forward hid in "optimizer",
and the optimizer's subscribers read gradients before the closure had made them)."""
import collections

import pytest
import torch
import torch.nn.functional as F

import memprof
from memprof.analyse import summary
from memprof.record.events import PHASES


def _phases_by_op(prof) -> dict:
    m = prof.memory
    out = collections.defaultdict(set)
    for op, phase, size in zip(m["op"], m["phase"], m["size"]):
        if size > 0:
            out[prof.strings[int(op)] if op >= 0 else ""].add(PHASES[int(phase)])
    return out


def _train(step_with_closure: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3, history_size=3)
    x, y = torch.randn(32, 8), torch.randn(32, 1)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    with memprof.track(model, optimizer=opt) as prof:
        for _ in range(4):
            if step_with_closure:
                opt.step(closure)
            else:
                opt.step(closure=closure)
    return prof, model


def test_lbfgs_update_is_in_the_optimizer_phase():
    prof, _ = _train(step_with_closure=True)
    phases = _phases_by_op(prof)
    # LBFGS flattens the gradients (cat) after each closure: its own work
    assert phases["aten::cat"] == {"optimizer"}
    assert phases["aten::linear"] == {"forward"}
    tp = summary(prof)["throughput"]
    assert tp["stats"]["forward_ms"]["median"] > 0
    assert tp["stats"]["optimizer_ms"]["median"] > 0
    assert tp["batch_size"] == 32 and len(prof.marker_positions("step")) == 4


def test_closure_by_keyword_gives_the_same_phases():
    by_position, model_a = _train(step_with_closure=True)
    by_keyword, model_b = _train(step_with_closure=False)
    assert _phases_by_op(by_position) == _phases_by_op(by_keyword)
    # tracking changed nothing in the training
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_a_closure_that_raises_leaves_no_update_waiting():
    """step(closure) whose closure raised left the optimizer waiting for its update to start:
    the next plain step() started it twice (a second optimizer_start after the update)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)

    def failing():
        raise RuntimeError("out of memory in the closure")

    with memprof.track(model, optimizer=opt) as prof:
        try:
            opt.step(failing)
        except RuntimeError:
            pass
        for _ in range(2):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
    assert len(prof.markers("optimizer_start")) == 2 and len(prof.marker_positions("step")) == 2


def test_lbfgs_line_search_is_no_accumulation_and_not_the_steps_loss():
    """LBFGS calls its closure again in its line search: the same batch, evaluated again. It
    read "3 micro-steps (gradient accumulation)" at 3x the samples/s, and the health loss was
    the mean of the line search's losses instead of the first, which LBFGS returns."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    batches = [(torch.randn(32, 8), torch.randn(32, 1)) for _ in range(4)]
    returned, calls = [], []
    with memprof.track(model, optimizer=opt, health=True) as prof:
        for x, y in batches:
            def closure():
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                calls.append(1)
                return loss
            returned.append(float(opt.step(closure)))
    assert len(calls) > 2 * len(batches)                 # the line search ran
    tp = summary(prof)["throughput"]
    assert tp["micro_steps_per_step"] == 1 and not tp["gradient_accumulation"]
    assert tp["per_step"]["samples"] == [32] * 4
    losses = summary(prof)["health"]["per_step"]["loss"]
    assert losses == pytest.approx(returned, abs=1e-5)
    assert tp["stats"]["forward_ms"]["median"] > 0
