"""`memprof run` of a loop that builds a model per fold (k-fold cross-validation, a sweep):
python frees each fold's model when the next is built; auto mode's list of roots kept every
one alive (their weights and gradients: the peak grew by a model per fold, and a sweep that
fits under python ran out of memory under memprof). Roots are held weakly; a freed root keeps
its names, and the parameters of each fold's model are still parameters."""
import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import gc, weakref
    import torch
    from torch import nn

    alive = []

    def train_fold(k):
        # each fold wider than the last: the run's peak is in the last fold
        model = nn.Sequential(nn.Linear(256, 512 * (k + 1)), nn.ReLU(),
                              nn.Linear(512 * (k + 1), 10))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(torch.randn(16, 256)),
                                               torch.randint(0, 10, (16,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
        alive.append(weakref.ref(model))

    for k in range(4):
        train_fold(k)
        gc.collect()
        print("fold", k, "models alive:", sum(r() is not None for r in alive))
''')


def _last_fold_parameter_bytes() -> int:
    width = 512 * 4
    return 4 * (256 * width + width + width * 10 + 10)


def test_each_folds_model_is_freed_as_under_python(tmp_path):
    script = tmp_path / "kfold.py"
    script.write_text(SCRIPT)
    plain = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    r = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--json", str(script)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and r.returncode == 0, r.stderr
    assert "models alive: 0" in plain.stdout
    # the script's own output, as under python: no fold's model outlives its fold
    printed = [line for line in r.stderr.splitlines() + r.stdout.splitlines()
               if "models alive" in line]
    assert printed == [line for line in plain.stdout.splitlines() if "models alive" in line]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    params = _last_fold_parameter_bytes()
    # the peak holds the last fold's model (weights, gradients, Adam's two moments, its
    # activations), not the three before it too
    assert summary["by_category_at_peak"]["parameters"] == params
    assert params * 4 <= summary["peak_bytes"] < params * 6, summary["peak_bytes"]
    assert summary["end_bytes"] < params
    assert summary["meta"]["model_class"] == "Sequential"
    assert not [f for f in summary["findings"] if f["kind"] in ("memory_growth", "leak")]
