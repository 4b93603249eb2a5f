"""Real (small) tracked runs that the report tests read back."""
import pytest
import torch

import memprof


class Net(torch.nn.Module):
    """encoder (Linear, ReLU, Linear) -> head: a module tree two levels deep."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                           torch.nn.Linear(256, 128))
        self.head = torch.nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.encoder(x))


def train(steps: int = 5, leak: bool = True, health: bool = True):
    """A tracked AdamW loop with clipping and a warmup schedule; with leak=True every step's
    loss (and its graph) is kept in a list, which memprof reports as a retained graph."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    kept = []
    with memprof.track(model, opt, health=health) as prof:
        for _ in range(steps):
            x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            sched.step()
            prof.log(loss=loss.item())
            if leak:
                kept.append(loss)
    return prof.profile


@pytest.fixture(scope="session")
def leaky_profile():
    return train()


@pytest.fixture(scope="session")
def clean_profile():
    return train(steps=3, leak=False, health=False)
