"""`memprof.track(model, opt, batch_size=N)`: the batch size given because the inputs do not
show it - a dict, or a (seq, batch, feature) layout whose leading dimension is the sequence.
It fed samples/s, but the fit was left without a batch size (the 'batch' markers are not
written when it is given): "what would fit" read "batch size not recorded", was not
re-estimated ("the model's inputs were not recorded"), and the batch the loop made stayed
at its size in the scaled replay. Checked against real runs at 2N."""
import pytest
import torch

import memprof
from memprof.plan.allocator import simulate
from memprof.plan.fit import batch_function, batch_size_at, scaled_fit, scaled_stream, what_fits

S, F, H, C, STEPS = 64, 1024, 32, 4, 3
N = 8
MIB = 1 << 20


class SeqFirst(torch.nn.Module):
    """Takes (seq, batch, feature), as nn.LSTM / nn.Transformer do by default."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = torch.nn.Linear(F, H), torch.nn.Linear(H, C)

    def forward(self, x):
        return self.head(self.proj(x).relu().mean(0))


class DictIn(torch.nn.Module):
    """Takes a dict of tensors, as tokenizer outputs are passed."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = torch.nn.Linear(F, H), torch.nn.Linear(H, C)

    def forward(self, batch):
        h = self.proj(batch["x"]).relu() * batch["mask"].unsqueeze(-1)
        return self.head(h.mean(1))


def make_batch(layout: str, batch: int, g):
    if layout == "seq_first":
        return torch.randn(S, batch, F, generator=g)
    return {"x": torch.randn(batch, S, F, generator=g), "mask": torch.ones(batch, S)}


def train(layout: str, batch: int):
    torch.manual_seed(0)
    model = SeqFirst() if layout == "seq_first" else DictIn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    with memprof.track(model, opt, batch_size=batch) as prof:
        for _ in range(STEPS):   # the loop makes its batch, as a DataLoader would
            model(make_batch(layout, batch, g)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    return prof, model, opt


def peaks(p, factor: float) -> tuple[int, int]:
    """(allocated, reserved) peak in the run's last step, scaled by `factor` and replayed."""
    step = p.steps[-1]
    r = simulate(scaled_stream(p, step, factor, accumulate=False), capacity=1 << 40)
    return int(r.allocated[step.start:step.end].max()), int(r.reserved[step.start:step.end].max())


@pytest.fixture(scope="module", params=["seq_first", "dict"])
def runs(request):
    return request.param, {b: train(request.param, b) for b in (N, 2 * N)}


def test_the_fit_uses_the_batch_size_given(runs):
    layout, by_batch = runs
    p = by_batch[N][0].profile
    assert batch_size_at(p, p.steps[-1].index) == N
    fit = scaled_fit(p, 1 * MIB, p.steps[-1].index)
    assert fit["batch"] == N and fit["effective_batch"] == N, fit


def test_the_step_at_twice_the_batch_is_predicted(runs):
    layout, by_batch = runs
    seen, real = by_batch[N][0].profile, by_batch[2 * N][0].profile
    predicted, actual = peaks(seen, 2.0), peaks(real, 1.0)
    assert predicted[0] == pytest.approx(actual[0], rel=0.15), (layout, predicted, actual)
    assert predicted[1] == pytest.approx(actual[1], rel=0.15), (layout, predicted, actual)


def test_what_would_fit_is_re_estimated_at_the_batch_given(runs):
    layout, by_batch = runs
    prof, model, opt = by_batch[N]
    p = prof.profile
    inputs = p.run.records["inputs"]
    built, _ = batch_function(model, inputs, N, given=True)(2 * N)
    if layout == "seq_first":
        assert built[0].shape == (S, 2 * N, F)       # the batch dimension, not the sequence
    else:
        assert built[0]["x"].shape == (2 * N, S, F) and built[0]["mask"].shape == (2 * N, S)
    budget = peaks(p, 1.0)[1] // 2
    out = what_fits(p, budget, budget, "half the run", p.steps[-1].index, model=model,
                    optimizer=opt)
    assert out["note"] is None and out["estimate"] is not None, out["note"]
    assert out["estimate"]["micro_batch"] == N and out["scaled"]["batch"] == N


def test_only_a_batch_size_given_is_looked_for_beyond_the_leading_dimension():
    """A batch read from the markers is an input's leading dimension: where a later step's
    differs from the recorded first pass's (batches of 32, then 16, at sequence length 16),
    the sequence dimension of that size is not the batch."""
    from memprof.plan.fit import batch_dim
    inputs = {"args": [{"tensor": {"shape": [32, 16], "dtype": "int64", "device": "cpu"}}],
              "kwargs": {}}
    assert batch_dim(inputs, 32) == 0 and batch_dim(inputs, 32, given=True) == 0
    assert batch_dim(inputs, 16) is None and batch_dim(inputs, 16, given=True) == 1
    assert batch_dim(inputs, 7, given=True) is None
