"""Loops without torch.optim (pytorch/examples word_language_model's default path updates
`p.data.add_(p.grad, alpha=-lr)` by hand): steps, gradients and leaks are found as with an
optimizer (issue 14)."""
import pytest
import torch

import memprof
from memprof.analyse import throughput


class LM(torch.nn.Module):
    """A small LSTM language model in the shape of word_language_model's RNNModel."""

    def __init__(self, vocab=50, hidden=32):
        super().__init__()
        self.encoder = torch.nn.Embedding(vocab, hidden)
        self.rnn = torch.nn.LSTM(hidden, hidden)
        self.decoder = torch.nn.Linear(hidden, vocab)

    def forward(self, x, h):
        out, h = self.rnn(self.encoder(x), h)
        return self.decoder(out), h


def train(steps, leak=False, accumulate=1):
    torch.manual_seed(0)
    model = LM()
    lr, kept, total_loss = 0.5, [], 0.0
    with memprof.track(model) as prof:
        for i in range(steps):
            model.zero_grad()
            for _ in range(accumulate):
                h = (torch.zeros(1, 4, 32), torch.zeros(1, 4, 32))
                x, y = torch.randint(0, 50, (6, 4)), torch.randint(0, 50, (6, 4))
                output, h = model(x, h)
                loss = torch.nn.functional.cross_entropy(output.reshape(-1, 50), y.reshape(-1))
                loss.backward()
                if leak:
                    kept.append(output)          # planted: a graph per step
                    total_loss += loss           # planted: a tensor accumulator
                else:
                    total_loss += loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
    return prof, model


def test_steps_and_gradients_of_a_hand_written_update():
    prof, model = train(steps=5)
    assert len(prof.markers("step")) == 5
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters())
    params = sum(p.untyped_storage().nbytes() for p in model.parameters())
    end = prof.breakdown("category", at="end")
    assert end["gradients"] == grads and end["parameters"] == params
    assert memprof.findings(prof) == []
    t = throughput.summarize(prof)
    assert t["steps"] == 5 and t["per_step"]["micro_steps"] == [1] * 5


def test_accumulation_without_an_optimizer_is_one_step_per_update():
    prof, _ = train(steps=3, accumulate=2)
    assert len(prof.markers("step")) == 3
    assert throughput.summarize(prof)["per_step"]["micro_steps"] == [2, 2, 2]


def test_both_planted_leaks_are_found_without_an_optimizer():
    prof, _ = train(steps=5, leak=True)
    found = [f for f in memprof.findings(prof) if f.kind == "retained_graph"]
    holders = " ".join(f.holder or "" for f in found)
    assert "kept" in holders and "total_loss" in holders, [f.message for f in found]


def test_an_optimizer_loop_is_not_split_by_parameter_reads():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt) as prof:
        for i in range(6):
            model(torch.randn(4, 8)).sum().backward()
            if i % 3 == 2:              # accumulation over 3 micro-steps
                opt.step()
                opt.zero_grad()
    assert len(prof.markers("step")) == 2


def test_autograd_grad_of_what_is_not_a_parameter_ends_no_step():
    """A gradient with respect to the inputs (an adversarial example, a saliency map) before
    a backward: the step still ends at the update of the parameters, once per step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    with memprof.track(model) as prof:
        for _ in range(3):
            x = torch.randn(8, 4, requires_grad=True)
            g, = torch.autograd.grad(model(x).sum(), x)
            model((x + 0.1 * g.sign()).detach()).pow(2).mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
    assert len(prof.steps) == 3


def test_autograd_grad_of_the_parameters_as_a_generator_is_read_once():
    """`torch.autograd.grad(loss, model.parameters())`: the generator was spent by the call
    before memprof read it (one step for four)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    with memprof.track(model) as prof:
        for _ in range(4):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            grads = torch.autograd.grad(loss, model.parameters())
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads):
                    p -= 0.1 * g
    assert len(prof.steps) == 4


@pytest.mark.parametrize("loop", ["two grads per forward", "retain_graph backward twice"])
def test_no_update_watch_is_left_on_after_the_block(loop):
    """A second grad (or backward) before the next forward is handed by torch to the update
    watch's torch function mode, which called memprof's hook from inside it: a second copy of
    the mode was pushed, and stayed on the stack after the block (every torch call of the
    program then went through it)."""
    from torch.overrides import _get_current_function_mode_stack
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    with memprof.track(model) as prof:
        for _ in range(3):
            out = model(torch.randn(8, 4))
            if loop == "two grads per forward":   # per-task gradients (PCGrad's shape)
                g1 = torch.autograd.grad(out[:, 0].mean(), list(model.parameters()),
                                         retain_graph=True)
                g2 = torch.autograd.grad(out[:, 1].mean(), list(model.parameters()))
                grads = [a + b for a, b in zip(g1, g2)]
            else:
                out[:, 0].mean().backward(retain_graph=True)
                out[:, 1].mean().backward()
                grads = [p.grad for p in model.parameters()]
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads):
                    p -= 0.1 * g
                    p.grad = None
    assert _get_current_function_mode_stack() == []
    assert len(prof.steps) == 3
