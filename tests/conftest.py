import gc

import pytest
import torch

from tiny_mlp import MLP


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP()


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    """Profiles saved by failing blocks land in a temporary directory, never in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def collect_garbage_after():
    """Leave no cyclic garbage (models, tensors) for a later test's tracked block to free."""
    yield
    gc.collect()
