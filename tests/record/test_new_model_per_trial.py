"""A sweep that builds a new model and a new optimizer per trial (an LR or width search, an
Optuna objective) inside one `track(model)` block: only the model track() was given, the
first trial's and the last's parameters were noted, so a middle trial's weights read "other"
at its steps (and at the peak, had it been there)."""
import torch

import memprof


def _build():
    return torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 10))


def test_every_trials_parameters_are_parameters_at_its_steps():
    torch.manual_seed(0)
    first = _build()
    nbytes = sum(p.numel() * p.element_size() for p in first.parameters())
    x, y = torch.randn(16, 128), torch.randint(0, 10, (16,))
    trials, steps = 4, 2
    with memprof.track(first) as prof:
        model = first
        for trial in range(trials):
            if trial:
                model = _build()
            opt = torch.optim.AdamW(model.parameters(), lr=10.0 ** (trial - 4))
            for _ in range(steps):
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
    assert len(prof.steps) == trials * steps and not prof.partial_last_step
    for i in range(trials * steps):
        at = prof.breakdown("category", at=i)           # at the step's end
        alive = nbytes if i < steps else 2 * nbytes    # the given model and the trial's
        assert at["parameters"] == alive, (i, at)
        assert at["optimizer_state"] >= 2 * nbytes, (i, at)
        assert at["other"] < nbytes // 4, (i, at)
