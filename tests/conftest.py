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


@pytest.fixture(autouse=True)
def _same_random_state_for_every_test():
    """Every test starts from seed 0 and leaves the CPU generator as it found it: a test that
    seeds it (the attention cases draw a fresh seed per run) cannot change the data of the
    tests after it, so a failure replays from the test alone. manual_seed seeds CUDA's
    generators lazily, without initialising CUDA."""
    with torch.random.fork_rng(devices=[]):    # devices: CUDA's generators are not forked
        torch.manual_seed(0)                    # (forking them would initialise CUDA)
        yield


@pytest.fixture(autouse=True)
def _no_launcher_environment(monkeypatch):
    """A shell inside torchrun (RANK, WORLD_SIZE set) would rename every saved profile
    (name.rank<R>.memprof) and make ranks of single-process tests; tests that launch ranks
    set these themselves."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def collect_garbage_after():
    """Leave no cyclic garbage (models, tensors) for a later test's tracked block to free."""
    yield
    gc.collect()


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """write(name, source): a user's module file in the (temporary) current directory, as
    `memprof recommend --model name:factory` typed there imports it; not on sys.path, not
    cached from an earlier test."""
    import sys

    def write(name: str, source: str):
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.delitem(sys.modules, name, raising=False)
        return tmp_path
    return write
