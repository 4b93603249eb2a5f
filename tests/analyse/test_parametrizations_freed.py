"""Parametrizations of a model freed before the block ends: under `memprof run` the script's
main() has returned (its model freed) when the profile is built. The record of torch's
ParametrizationLists was read then from the modules still alive - none - so new-style
weight_norm and a LoRA-style parametrization read as ordinary activations, and the scaled
fit scaled the recomputed weights with the batch. The lists are noted when modules are
named, so a model that is gone by the end is still known."""
import gc
import subprocess
import sys
import textwrap

import torch

import memprof
from memprof.record.events import CAT_RECOMPUTED_WEIGHTS

SCRIPT = textwrap.dedent('''
    import gc

    import torch
    from torch import nn
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm


    class LoRA(nn.Module):
        """W + B @ A, rank 4."""

        def __init__(self, out_f, in_f):
            super().__init__()
            self.a = nn.Parameter(torch.randn(4, in_f) * 0.01)
            self.b = nn.Parameter(torch.zeros(out_f, 4))

        def forward(self, w):
            return w + self.b @ self.a


    def main():
        torch.manual_seed(0)
        lora = nn.Linear(256, 256)
        parametrize.register_parametrization(lora, "weight", LoRA(256, 256))
        model = nn.Sequential(weight_norm(nn.Linear(256, 256)), nn.ReLU(), lora, nn.ReLU(),
                              weight_norm(nn.Linear(256, 4)))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(4):
            model(torch.randn(8, 256)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()


    if __name__ == "__main__":
        main()
        gc.collect()   # the model, in a cycle through parametrize's class, freed here
''')

#: the modules whose weight is recomputed at each forward
OWNERS = {"0", "2", "4"}


def _recomputed_owners(p) -> set[str]:
    sel = (p.category == CAT_RECOMPUTED_WEIGHTS) & (p.memory["size"] > 0)
    # (the root's own name, `Sequential` or none, left out)
    return {p.module_name(int(m)).rsplit(".", 1)[-1] for m in p.event_module[sel]}


def test_a_model_freed_in_the_block_keeps_its_parametrizations(tmp_path):
    namespace: dict = {"__name__": "train"}
    exec(compile(SCRIPT, "train.py", "exec"), namespace)
    with memprof.track(autosave=None, auto_modules=True) as prof:   # as memprof run
        namespace["main"]()
        gc.collect()   # its model, in a cycle through parametrize's class, freed now
    p = prof.profile
    assert len(p.run.records["parametrizations"]) == 3
    assert _recomputed_owners(p) == OWNERS
    p.save(tmp_path / "run.memprof")
    assert _recomputed_owners(memprof.load(tmp_path / "run.memprof")) == OWNERS


def test_memprof_run_of_a_main_that_returns(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--autosave", "0", "-o",
                        "run.memprof", str(script)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _recomputed_owners(memprof.load(tmp_path / "run.memprof")) == OWNERS


def test_a_live_model_is_found_once():
    """Noted when named and found again alive at the end: one entry per list."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(64, 64)), torch.nn.ReLU())
    with memprof.track(autosave=None, auto_modules=True) as prof:
        for _ in range(3):
            model(torch.randn(4, 64)).sum().backward()
    p = prof.profile
    assert p.run.records["parametrizations"] == [[p.modules.index("0.parametrizations.weight"),
                                                  p.modules.index("0")]]
    assert _recomputed_owners(p) == {"0"}
