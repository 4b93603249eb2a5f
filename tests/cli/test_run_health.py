"""`memprof run --health`: the training-health records (loss, grad norm, LR per step) and their
findings for an unmodified script, as `memprof.track(health=True)` gives them. Without it a
user of seeds/003 (a scheduler stepped per micro-batch: warmup and decay 4x too fast) running
`memprof run train.py` could not get the finding at all."""
import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import torch
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 8))
    for i in range(32):                  # accumulation 4: 8 optimizer steps
        model(torch.randn(4, 8)).square().mean().backward()
        if (i + 1) % 4 == 0:
            opt.step()
            opt.zero_grad()
        sched.step()                     # the seed's mistake: once per micro-batch
''')


def _run(tmp_path, *options):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--json", *options,
                        str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_health_findings_of_an_unmodified_script(tmp_path):
    doc = _run(tmp_path, "--health")
    kinds = [f["kind"] for f in doc["findings"]]
    assert "lr_schedule_per_micro_step" in kinds, kinds
    without = _run(tmp_path)
    assert "lr_schedule_per_micro_step" not in [f["kind"] for f in without["findings"]]
