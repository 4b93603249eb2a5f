"""The script is compiled as python compiles it: with its own `from __future__` imports only,
not memprof's (memprof's cli modules use `annotations`, and compile() inherits the caller's
future flags unless told not to: every annotation of the script read as a string)."""
import subprocess
import sys
import textwrap

SCRIPT = '''
import dataclasses
import torch

@dataclasses.dataclass
class Config:
    lr: float = 0.1
    steps: int = 3

def scale(x: torch.Tensor, by: float) -> torch.Tensor:
    return x * by

cfg = Config()
model = torch.nn.Linear(8, 2)
opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
for _ in range(cfg.steps):
    scale(model(torch.randn(4, 8)), 2.0).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
print("fields", [f.type.__name__ for f in dataclasses.fields(Config)])
print("hints", {k: v.__name__ for k, v in scale.__annotations__.items()})
'''


def _both(tmp_path, *memprof_options):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    python = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    memprof = subprocess.run([sys.executable, "-m", "memprof.cli", "run", *memprof_options,
                              str(script)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    return python, memprof


def _script_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("fields", "hints"))]


def test_annotations_are_objects_as_under_python(tmp_path):
    python, memprof = _both(tmp_path)
    assert python.returncode == 0 and memprof.returncode == 0, memprof.stderr
    assert _script_lines(python.stdout) == ["fields ['float', 'int']",
                                            "hints {'x': 'Tensor', 'by': 'float', "
                                            "'return': 'Tensor'}"]
    assert _script_lines(memprof.stdout) == _script_lines(python.stdout)


def test_a_step_on_function_keeps_them_too(tmp_path):
    python, memprof = _both(tmp_path, "--step-on", "scale")
    assert memprof.returncode == 0, memprof.stderr
    assert _script_lines(memprof.stdout) == _script_lines(python.stdout)
