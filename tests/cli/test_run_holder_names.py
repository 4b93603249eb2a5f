"""`memprof run` of a script whose loop lives in `main()`: memprof enters the block from its
own frame, whose locals (its tracker) reached the model only through memprof - a retained
graph was named `_run_script.<locals>.tracker.session.scope.pass_module.blocks.0.history`.
The holder is named from the root module as the code called it."""
import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)
            self.history = []

        def forward(self, x):
            attn = torch.softmax(self.lin(x) @ x.T, dim=-1)
            self.history.append(attn)          # kept without detach: a graph per step
            return attn @ x

    def main():
        model = torch.nn.Sequential(Block(), torch.nn.Linear(16, 16))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(6):
            model(torch.randn(32, 16)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    if __name__ == "__main__":
        main()
''')


def test_a_leak_in_main_is_named_from_the_model_not_memprofs_objects(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--json", str(script)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    graphs = [f for f in json.loads(r.stdout)["findings"] if f["kind"] == "retained_graph"]
    assert graphs, r.stdout
    holders = [f["holder"] for f in graphs]
    assert not any("tracker" in h or "_run_script" in h or "scope" in h for h in holders)
    assert any(h.endswith("0.history") for h in holders), holders
