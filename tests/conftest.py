import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


class MLP(torch.nn.Module):
    """Linear(D,H) -> ReLU -> Linear(H,C): activation sizes are easy to compute by hand."""

    def __init__(self, d=64, h=128, c=10):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, h)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(h, c)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP()


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    """Profiles saved by failing blocks land in a temporary directory, never in the repo."""
    monkeypatch.chdir(tmp_path)
