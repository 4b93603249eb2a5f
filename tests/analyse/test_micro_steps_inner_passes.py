"""Micro-steps are the passes that accumulate into .grad (backward()), not every pass of the
autograd engine: a MAML inner loop (torch.func.grad, or torch.autograd.grad with
create_graph=True) and a gradient penalty run passes of their own. A MAML step of 3 tasks x 2
inner steps read "7 micro-steps per optimizer step" - gradient accumulation it does not do,
and recommend would plan for it."""
import pytest
import torch
from torch.func import functional_call, grad

import memprof


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def _data(n=5):
    return torch.randn(n, 4), torch.randn(n, 1)


def _maml(model, opt, steps: int, *, functorch: bool, tasks: int = 3, inner: int = 2):
    def loss_of(params, x, y):
        return ((functional_call(model, params, (x,)) - y) ** 2).mean()

    for _ in range(steps):
        opt.zero_grad()
        outer = 0
        for _ in range(tasks):
            params = dict(model.named_parameters())
            (xs, ys), (xq, yq) = _data(), _data()
            for _ in range(inner):
                if functorch:
                    g = grad(loss_of)(params, xs, ys)
                else:
                    g = dict(zip(params, torch.autograd.grad(
                        loss_of(params, xs, ys), list(params.values()), create_graph=True)))
                params = {k: p - 0.1 * g[k] for k, p in params.items()}
            outer = outer + loss_of(params, xq, yq)
        outer.backward()
        opt.step()


@pytest.mark.parametrize("functorch", [True, False], ids=["torch.func.grad", "autograd.grad"])
def test_a_maml_step_is_one_micro_step(functorch):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with memprof.track(model, opt) as prof:
        _maml(model, opt, 4, functorch=functorch)
    t = prof.throughput
    assert t["steps"] == 4
    assert t["micro_steps_per_step"] == 1 and not t["gradient_accumulation"]


def test_accumulated_micro_steps_with_a_gradient_penalty_each_are_counted_once():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with memprof.track(model, opt) as prof:
        for _ in range(3):
            for _ in range(3):   # three micro-steps, each with its own penalty pass
                x = torch.randn(6, 4, requires_grad=True)
                out = model(x)
                g, = torch.autograd.grad(out.sum(), x, create_graph=True)
                ((out ** 2).mean() + ((g.norm(dim=1) - 1) ** 2).mean()).backward()
            opt.step()
            opt.zero_grad()
    t = prof.throughput
    assert t["per_step"]["micro_steps"] == [3, 3, 3]
    assert t["gradient_accumulation"] and t["per_step"]["samples"] == [18, 18, 18]


def test_a_step_without_a_backward_call_counts_every_pass():
    """Marked calls decide per step: a step of two autograd.grad passes (a functional loop
    accumulating) is two micro-steps even where another step of the run called backward()."""
    from memprof.analyse.throughput import phase_table
    ms = 1_000_000
    entries = [("step", 0, 0)]
    t = 0
    for step in (1, 2):
        for _ in range(2):
            entries += [("forward_start", (t := t + ms), step), ("forward_end", (t := t + ms), step)]
            if step == 1:
                entries.append(("backward_call", (t := t + ms), step))
            entries += [("backward_start", (t := t + ms), 0), ("backward_end", (t := t + ms), step)]
        entries.append(("step", (t := t + ms), step))
    assert phase_table(entries)["micro_steps"][1:] == [2, 2]
    # the first step's second pass made without a backward() call (an autograd.grad's): that
    # step is one micro-step; the second, without any call, still two
    calls = [i for i, e in enumerate(entries) if e[0] == "backward_call"]
    marked_once = entries[:calls[1]] + entries[calls[1] + 1:]
    assert phase_table(marked_once)["micro_steps"][1:] == [1, 2]


def test_backward_calls_are_micro_steps_when_no_pass_of_the_model_is_seen():
    """A step read 0 micro-steps where the model's forward never ran as a pass (its children
    called by a method of its own): each backward() call is one."""
    from memprof.analyse.throughput import phase_table
    entries = [("step", 0, 0)]
    t = 10
    for _ in range(4):
        entries += [("backward_call", t, 0), ("backward_start", t + 1, 0),
                    ("backward_end", t + 2, 0)]
        t += 10
    entries += [("optimizer_start", t, 0), ("step", t + 5, 0)]
    assert phase_table(entries, batch_override=8)["micro_steps"] == [0, 4]
    assert phase_table(entries, batch_override=8)["samples"] == [None, 32]
