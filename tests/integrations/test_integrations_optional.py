"""memprof imports without the frameworks; an integration without its framework is a one-line
ImportError naming the package to install."""
import subprocess
import sys

import pytest

CASES = [
    (["transformers"], "memprof.integrations.huggingface", "pip install transformers"),
    (["lightning", "pytorch_lightning"], "memprof.integrations.lightning",
     "pip install lightning"),
]


@pytest.mark.parametrize("blocked, module, hint", CASES)
def test_missing_framework(blocked, module, hint):
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            "import memprof, memprof.integrations\n"
            f"assert not any(m in sys.modules and sys.modules[m] for m in {blocked!r})\n"
            f"try:\n    import {module}\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ERR")]
    assert len(lines) == 1 and hint in lines[0], out.stdout


def test_memprof_does_not_import_the_frameworks():
    code = ("import sys, memprof\n"
            "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
