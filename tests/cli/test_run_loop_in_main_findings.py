"""`memprof run` of a script whose training loop lives in `main()`: the run's block ends after
main() returned and freed the model and its optimizer, and the two findings that look at them
as the block ends were lost - a part of the model that gets gradients and no optimizer updates
(gradients_not_trained), and blocks under checkpoint(..., use_reentrant=True) whose input needs
no gradient (parameters_without_gradients) - where the same loop at the script's top level (its
objects outlive the block) had both. The same figures now come from a look while the loop ran,
saying how many steps it judged."""
import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    D = 32

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, x):
            return x + torch.relu(self.lin(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(2))
            self.head = nn.Linear(D, 8)
            self.probe = nn.Linear(D, 8)    # gets gradients; the optimizer is not given it

        def forward(self, x):
            for b in self.blocks:   # raw input: no gradient reaches the blocks' weights
                x = checkpoint(b, x, use_reentrant=True)
            return self.head(x).square().mean() + self.probe(x).square().mean()

    def train(steps):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.AdamW([*model.blocks.parameters(), *model.head.parameters()])
        for _ in range(steps):
            model(torch.randn(16, D)).backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    def main():
        train(STEPS)

    STEPS = int(sys.argv[2])
    if sys.argv[1] == "main":
        if __name__ == "__main__":
            main()
    else:
        model, opt = train(STEPS)   # module level: they outlive the block
''')

STEPS = 5   # the last look while the loop runs is at the 4th step's end
D = 32


@pytest.fixture(scope="module")
def findings(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop_in_main")
    script = tmp / "train.py"
    script.write_text(SCRIPT)
    out = {}
    for where in ("main", "module"):
        r = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--json", str(script),
                            where, str(STEPS)], cwd=tmp, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        out[where] = {f["kind"]: f for f in json.loads(r.stdout)["findings"]}
    return out


def test_gradients_no_optimizer_updates_are_found_in_main(findings):
    found = findings["main"].get("gradients_not_trained")
    assert found is not None, list(findings["main"])
    module = findings["module"]["gradients_not_trained"]
    assert module["bytes"] == (D * 8 + 8) * 4                     # probe.weight, probe.bias
    assert module["evidence"]["parameters"] == 2
    assert module["evidence"]["steps"] == STEPS
    assert found["severity"] == module["severity"] == "warning"
    for key in ("parameters", "names", "trained_parameters"):
        assert found["evidence"][key] == module["evidence"][key], key
    assert found["bytes"] == module["bytes"]
    assert "probe.weight" in found["message"]
    # judged at the last look while the loop ran, and said so
    assert found["evidence"]["steps"] == 4
    assert f"after step 4 of {STEPS}" in found["message"]


def test_parameters_without_gradients_are_found_in_main(findings):
    found = findings["main"].get("parameters_without_gradients")
    assert found is not None, list(findings["main"])
    module = findings["module"]["parameters_without_gradients"]
    assert module["bytes"] == 2 * (D * D + D) * 4                 # the two blocks' weights
    assert module["evidence"]["parameters"] == 4
    assert module["evidence"]["steps"] == STEPS
    assert found["severity"] == module["severity"] == "warning"
    for key in ("parameters", "names", "held_bytes"):
        assert found["evidence"][key] == module["evidence"][key], key
    assert found["bytes"] == module["bytes"]
    assert "blocks.0.lin.weight" in found["message"]
    # a look at step 4 of 5 does not claim 5
    assert found["evidence"]["steps"] == 4
    assert f"in the first 4 of {STEPS} steps" in found["message"]
