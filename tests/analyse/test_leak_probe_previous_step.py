"""A step function that returns its loss (`loss = train_step(x, y)` in `main()`, LBFGS's
`loss = opt.step(closure)`): while the call runs, the caller's `loss` still names the step
before's loss - until the call returns and rebinds it. The leak probe looks at step ends inside
that call; it read the variable as a graph 'still alive after later steps' backward' (an error
on correct code, failing the README's CI gate). A graph kept longer is still a leak."""
import torch
import torch.nn.functional as F

import memprof
from memprof.analyse.throughput import TIMING_KINDS

D, CLASSES, STEPS = 16, 4, 10


def _setup(optimizer=torch.optim.SGD, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, CLASSES))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, D, generator=g), torch.randint(0, CLASSES, (8,), generator=g))
            for _ in range(STEPS)]
    return model, optimizer(model.parameters(), lr=0.1, **kw), data


def _retained(prof):
    return [(f.holder, f.evidence.get("steps")) for f in prof.findings
            if f.kind == "retained_graph"]


def _track_main(keep, retain_graph=False):
    model, opt, data = _setup()

    def train_step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward(retain_graph=retain_graph)
        opt.step()
        return loss

    def main():
        losses, first = [], None
        for x, y in data:
            loss = train_step(x, y)
            if keep == "list":
                losses.append(loss)
            elif keep == "first" and first is None:
                first = loss
        return losses, first

    with memprof.track(model, opt) as prof:
        main()
    return prof


def test_the_loss_a_step_function_returns_is_no_leak():
    prof = _track_main("nothing")
    assert [f for f in prof.findings if f.kind not in TIMING_KINDS] == []   # (not the clock's)
    looks = [n for n, _ in prof.run.records["leak_probe"]["looks"]]
    assert looks[:3] == [2, 4, 8]    # the probe looked while main() ran, and made no record
    assert "graphs" not in prof.run.records["leak_probe"]


def test_a_list_of_returned_losses_is_still_a_leak():
    found = _retained(_track_main("list"))
    assert [h for h, _ in found] == ["main.<locals>.losses"], found
    assert found[0][1][0] == 0   # from the first step on


def test_a_variable_that_keeps_an_old_steps_loss_is_still_a_leak():
    found = _retained(_track_main("first"))
    assert [h for h, _ in found] == ["main.<locals>.first"], found
    assert found[0][1] == [0]


def test_a_returned_loss_whose_graph_keeps_its_saved_tensors_is_still_found():
    """`backward(retain_graph=True)`: the loss the caller's variable names pins its graph's
    saved activations through the whole next step; excused, nothing saw it (the block ends
    after main() has returned)."""
    found = _retained(_track_main("nothing", retain_graph=True))
    assert [h for h, _ in found] == ["main.<locals>.loss"], found


def test_lbfgs_loss_from_step_with_a_closure_is_no_leak():
    model, opt, data = _setup(torch.optim.LBFGS, max_iter=4)

    def loop():
        for x, y in data[:6]:
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            loss = opt.step(closure)
        return loss.item()

    with memprof.track(model, opt) as prof:
        loop()
    assert _retained(prof) == []
    assert [n for n, _ in prof.run.records["leak_probe"]["looks"]][:2] == [2, 4]
