"""A mixture-of-experts toy whose last expert gets no tokens in its first steps: under
`memprof run` the loop runs in main() and has freed the model and optimizer before the
block ends, so the look at step 4 stood, and an expert that trained from step 5 read 'never
got a gradient in the first 4 of 6 steps, so they do not train' (a warning). What got a
gradient after the look is not named; an expert that never gets tokens still is."""
import torch
from torch import nn

import memprof

D = 32
KINDS = ("parameters_without_gradients",)


class MoE(nn.Module):
    def __init__(self, first_step: int | None):
        super().__init__()
        self.inp = nn.Linear(16, D)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, 4 * D), nn.ReLU(), nn.Linear(4 * D, D)) for _ in range(4))
        self.out = nn.Linear(D, 4)
        self.first_step, self.t = first_step, 0   # the last expert's first step with tokens

    def forward(self, x):
        h = self.inp(x)
        route = torch.arange(h.shape[0]) % len(self.experts)
        if self.first_step is None or self.t < self.first_step:
            route[route == len(self.experts) - 1] = 0
        y = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            idx = (route == e).nonzero().squeeze(1)
            if idx.numel():   # an expert with no tokens is not called
                y[idx] = expert(h[idx])
        return self.out(h + y)


def main(first_step, steps=6):
    """The user's loop in a function: model and optimizer are freed as it returns."""
    torch.manual_seed(0)
    model = MoE(first_step)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(steps):
        model.t = i
        model(torch.randn(16, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return [bool(opt.state.get(p)) for p in model.experts[-1].parameters()]


def _run(first_step):
    with memprof.track(auto_modules=True) as prof:   # as `memprof run` tracks
        trained = main(first_step)
    return prof, trained


def test_an_expert_that_gets_tokens_after_the_last_look_is_not_named():
    prof, trained = _run(first_step=4)      # steps 5 and 6: after the look at step 4
    assert all(trained)
    assert not [f for f in memprof.findings(prof, "info") if f.kind in KINDS]


def test_an_expert_that_never_gets_tokens_is_named_from_the_last_look():
    prof, trained = _run(first_step=None)
    assert not any(trained)
    (f,) = [f for f in memprof.findings(prof, "info") if f.kind in KINDS]
    assert f.evidence["parameters"] == 4 and f.evidence["steps"] == 4
    assert "experts.3.0.weight" in f.message and "first 4 of 6 steps" in f.message
