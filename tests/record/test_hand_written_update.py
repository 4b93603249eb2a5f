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
            if update == "functional":    # gradients from torch.autograd.grad, no .grad
                grads = torch.autograd.grad(loss, list(model.parameters()))
                with torch.no_grad():
                    for p, g in zip(model.parameters(), grads):
                        p -= 0.05 * g
                losses.append(loss.item())
                continue
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


def test_a_functional_loop_has_its_steps_and_gradients():
    """Gradients from torch.autograd.grad, the update by hand: no step was found (steps came
    after backward() only) and the gradients read "other"."""
    prof, model, _ = _train("functional")
    assert len(prof.steps) == 5 and prof.throughput["micro_steps_per_step"] == 1
    # at the peak (inside a step's grad call) the step's gradients and those of the step
    # before, which the loop's `grads` still holds
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    assert prof.summary()["by_category_at_peak"]["gradients"] >= grads


@pytest.mark.parametrize("update", ["sub", "momentum", "functional"])
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


def test_sparse_gradients_train_as_before():
    """The watch read every gradient's data pointer: a sparse gradient (nn.Embedding(sparse=
    True)) has none, and loss.backward() raised on the first step of any loop."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    with memprof.track(emb, opt) as prof:
        for _ in range(3):
            emb(torch.randint(0, 50, (4, 6))).sum().backward()
            opt.step()
            opt.zero_grad()
    assert len(prof.steps) == 3 and not _get_current_function_mode_stack()


class _Counting(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("around", ["default device", "user mode"])
def test_another_torch_function_mode_is_left_alone(around):
    """Under torch.set_default_device or a user's mode the watch was pushed beneath it (the
    backward runs inside that mode's handler) and never came off: every op of every later
    step, and of the rest of the process, went through it."""
    user = _Counting()
    if around == "default device":
        torch.set_default_device("cpu")
    else:
        user.__enter__()
    try:
        prof, _, losses = _train("sub")
        stack = _get_current_function_mode_stack()
        assert not any(type(m).__name__ == "UpdateWatch" for m in stack)
        assert len(stack) == 1 and len(prof.steps) == 5 and len(losses) == 5
    finally:
        if around == "default device":
            torch.set_default_device(None)
        else:
            user.__exit__(None, None, None)
    assert not _get_current_function_mode_stack()


def test_with_accumulation_the_watch_is_off_during_forward():
    """Two micro-steps per hand-written update: the watch stayed on through the second
    micro-step's forward (every op paid a Python call; dynamo compiled a second graph)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            seen.append(len(_get_current_function_mode_stack()))
            return self.inner(x)

    net = Probe()
    with memprof.track(net) as prof:
        for i in range(8):
            net(torch.randn(4, 8)).sum().backward()
            if i % 2:
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.1 * p.grad
                        p.grad = None
    assert seen == [0] * 8
    assert len(prof.steps) == 4
    assert throughput.summarize(prof)["micro_steps_per_step"] == 2
