"""A loop without an optimizer (`p -= lr * p.grad`): its update is the optimizer phase - its
time in the throughput table, its temporaries' phase - as optimizer.step()'s would be. It was
"other" (optimizer 0 ms, the peak "at step 0, other" on the update's `lr * p.grad`), and the
next batch made after the update is not part of it."""
import collections

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import _get_current_function_mode_stack

import memprof
from memprof.analyse import throughput
from memprof.record.events import PHASES


def _phases_by_op(prof) -> dict:
    m = prof.memory
    out = collections.defaultdict(collections.Counter)
    for op, phase, size in zip(m["op"], m["phase"], m["size"]):
        if size > 0:
            out[prof.strings[int(op)] if op >= 0 else ""][PHASES[int(phase)]] += 1
    return out


def _train(update: str, tracked: bool = True, steps: int = 5):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05) if update == "torch.optim" else None
    y = torch.randn(8, 4)
    losses = []

    def loop():
        for _ in range(steps):
            x = torch.randn(8, 32)        # the next batch, made after the update
            loss = F.mse_loss(model(x), y)
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad()
                continue
            with torch.no_grad():
                for p in model.parameters():
                    if update == "sub":
                        p -= 0.05 * p.grad
                    else:                 # momentum, in a buffer kept on the parameter
                        buf = getattr(p, "_mom", None)
                        if buf is None:
                            buf = p._mom = torch.zeros_like(p)
                        buf.mul_(0.9).add_(p.grad)
                        p.data.add_(buf, alpha=-0.05)
                    p.grad = None
            losses.append(loss.item())
    if not tracked:
        loop()
        return None, model, losses
    with memprof.track(model) as prof:
        loop()
    return prof, model, losses


@pytest.mark.parametrize("update", ["sub", "momentum"])
def test_a_hand_written_update_is_the_optimizer_phase(update):
    prof, model, losses = _train(update)
    assert len(prof.steps) == 5
    phases = _phases_by_op(prof)
    if update == "sub":
        assert set(phases["aten::mul"]) == {"optimizer"}   # lr * p.grad
    assert set(phases["aten::randn"]) == {"other"}          # the next batch is not the update
    assert set(phases["aten::linear"]) == {"forward"}
    tp = throughput.summarize(prof)
    assert tp["stats"]["optimizer_ms"]["median"] > 0
    assert prof.peak_event["phase"] in ("optimizer", "forward", "backward")
    # tracking changed nothing, and left no torch function mode behind
    _, untracked, plain = _train(update, tracked=False)
    assert losses == plain
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), untracked.parameters()))
    assert not _get_current_function_mode_stack()


def test_an_optimizer_loop_is_left_to_the_optimizer_hooks():
    prof, _, _ = _train("torch.optim")
    assert not prof.marker_positions("update_start").size   # the watch stood aside
    assert not _get_current_function_mode_stack()
    assert _phases_by_op(prof)["aten::randn"].keys() == {"other"}
