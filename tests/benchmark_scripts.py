"""Loading a script of benchmarks/ in a test, by its file.

benchmarks/ is NOT put on sys.path: its scripts' names would shadow installed packages for the
whole test session (transformers imports a package called `kernels` when it finds one)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


def load(name: str):
    """benchmarks/<name>.py as module `name` (once per session); a script that imports
    `_results` from its directory gets it loaded the same way first."""
    if name in sys.modules:
        return sys.modules[name]
    if name != "_results":
        load("_results")
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def run_script(name: str, out, *args: str) -> tuple[str, dict, str]:
    """benchmarks/<name>.py run as a user runs it, with `--out out`: (its stdout, the JSON it
    saved, the table it saved); a failure of the script fails the test with its stderr."""
    r = subprocess.run([sys.executable, os.path.join(BENCHMARKS, f"{name}.py"), *args,
                        "--out", str(out)], capture_output=True, text=True, cwd=BENCHMARKS,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    with open(f"{out}.json") as f:
        payload = json.load(f)
    with open(f"{out}.txt") as f:
        return r.stdout, payload, f.read()
