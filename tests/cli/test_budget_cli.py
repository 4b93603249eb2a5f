"""`memprof report --budget` and `memprof run --budget`, and the OOM diagnosis of a script."""
import json
import os
import re
import subprocess
import sys

import pytest

LEAKY = '''
import sys
import torch

class Leaky(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 10)
        self.history = []

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        self.history.append(h)          # the leak: 1.5 MiB and a graph per step
        return self.fc2(h)

torch.manual_seed(0)
model = Leaky()
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(int(sys.argv[1])):
    x, y = torch.randn(384, 256), torch.randint(0, 10, (384,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
'''

OOM = '''
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(16, 16)

    def forward(self, x, step):
        x = self.encoder(x)
        if step == 1:
            x = x + torch.empty(1 << 50, dtype=torch.uint8).sum()
        return x

model = Net()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(3):
    model(torch.randn(4, 16), step).sum().backward()
    opt.step()
    opt.zero_grad()
'''


def memprof(*args, cwd):
    env = dict(os.environ, COLUMNS="250")
    return subprocess.run([sys.executable, "-m", "memprof.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def leak_profile(tmp_path_factory):
    d = tmp_path_factory.mktemp("budget")
    (d / "leaky.py").write_text(LEAKY)
    r = memprof("run", "-o", "leak.memprof", "leaky.py", "6", cwd=d)
    assert r.returncode == 0, r.stderr
    return d


def test_report_budget_on_a_gpu_projects_the_leak(leak_profile):
    r = memprof("report", "leak.memprof", "--budget", "v100-16gb", cwd=leak_profile)
    assert r.returncode == 0, r.stderr
    assert "Budget: v100-16gb" in r.stdout and "fits: peak" in r.stdout
    assert "runs out of memory at step ~" in r.stdout
    # the reserved peak's place, and the allocated maximum said apart (a growing run
    # allocates most at its end: "X reserved (Y allocated) at step 0" read as one moment)
    fits = " ".join(r.stdout.split())
    assert re.search(r"fits: peak [\d.]+ [KMG]iB reserved at step \d+, \w+.*\(allocated at "
                     r"most [\d.]+ [KMG]iB\); headroom", fits), fits

    r = memprof("report", "leak.memprof", "--budget", "v100-16gb", "--json", cwd=leak_profile)
    data = json.loads(r.stdout)
    proj = data["budget"]["projection"]
    assert data["budget"]["fits"] and proj["method"] == "replay of synthesized steps"
    # 14.4 GiB usable / 1.5 MiB per step: thousands of steps
    assert 5000 < proj["step"] < 12000
    assert any(f["kind"] == "budget" for f in data["findings"])


def test_report_byte_budget_fails_with_the_step_and_gates_ci(leak_profile):
    r = memprof("report", "leak.memprof", "--budget", str(22 << 20), "--fail-on-findings",
                cwd=leak_profile)
    assert r.returncode == 3
    out = " ".join(r.stdout.split())
    assert "does not fit: out of memory at step 0" in out
    assert "the first step already did not fit (memory also grows across steps" in out
    assert "micro-batch 192 x 2 accumulation steps (effective batch 384) fits" in out
    assert "memprof.track(model, budget=...) re-estimates them" in out
    r = memprof("report", "leak.memprof", "--json", cwd=leak_profile)   # file unchanged
    assert json.loads(r.stdout)["budget"] is None


def test_unknown_gpu_is_one_line(leak_profile):
    r = memprof("report", "leak.memprof", "--budget", "v200-99gb", cwd=leak_profile)
    assert r.returncode == 2 and "v100-16gb" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (leak_profile / "marker.py").write_text("open('ran', 'w').write('x')\n")
    r = memprof("run", "--budget", "v200-99gb", "marker.py", cwd=leak_profile)
    assert r.returncode == 2 and not (leak_profile / "ran").exists()


def test_a_capacity_below_the_cuda_context_is_one_line(leak_profile):
    """512mb minus the CUDA context and the margin leaves nothing: said up front, not as a
    check that could not run."""
    r = memprof("report", "leak.memprof", "--budget", "512mb", cwd=leak_profile)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "nothing is left to PyTorch's allocator on 512mb" in r.stderr
    assert "could not run" not in r.stdout


def test_bytes_in_exponent_form_and_kilobytes_are_budgets(leak_profile):
    """`22e6` and `1kb` were read as GPU names ("unknown GPU '22e6'")."""
    r = memprof("report", "leak.memprof", "--budget", "22e6", cwd=leak_profile)
    assert r.returncode == 0 and "does not fit: out of memory at step 0" in " ".join(
        r.stdout.split()), r.stderr
    # a capacity with a unit is a GPU of that size: its CUDA context comes off first
    r = memprof("report", "leak.memprof", "--budget", "1kb", cwd=leak_profile)
    assert r.returncode == 2 and "nothing is left to PyTorch's allocator on 1kb" in r.stderr
    for spec in ("2.5", "-5", "inf"):
        r = memprof("report", "leak.memprof", "--budget", spec, cwd=leak_profile)
        assert r.returncode == 2 and r.stderr.strip() == (
            f"memprof: --budget {spec}: expected a whole number of bytes > 0, a GPU name or "
            "a capacity such as 24gb")


def test_run_script_that_runs_out_of_memory_shows_the_diagnosis_once(tmp_path):
    (tmp_path / "oom.py").write_text(OOM)
    r = memprof("run", "--budget", "v100-16gb", "oom.py", cwd=tmp_path)
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert out.count("Out of memory: why") == 1
    assert "step 1, forward, module encoder" not in out   # the request is not the encoder's
    assert "step 1, forward, module Net, op aten::empty" in r.stdout
    assert "Budget: v100-16gb" in r.stdout
    assert (tmp_path / "oom.memprof").exists()


@pytest.mark.slow
def test_demo_leak_story_ends_with_the_v100_budget():
    from rich.console import Console

    from memprof.demo import _story_leak
    console = Console(record=True, width=250)
    bug, fixed = _story_leak(console, steps=4)
    text = " ".join(console.export_text().split())
    proj = bug.meta["budget"]["projection"]
    assert bug.meta["budget"]["budget"] == "v100-16gb" and bug.meta["budget"]["fits"]
    assert proj["step"] > 100 and proj["method"] == "replay of synthesized steps"
    assert f"the bug runs out of memory at step ~{proj['step']}" in text
    assert "the fix fits with" in text and fixed.meta["budget"]["projection"] is None
