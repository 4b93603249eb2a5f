"""The synthetic long profile of benchmarks/report_size.py (built with numpy), for tests."""
import importlib.util
from pathlib import Path

from memprof.profile import Profile

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "report_size.py"


def synthetic_profile(n_events: int, acts: int = 300) -> Profile:
    spec = importlib.util.spec_from_file_location("report_size", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return Profile(mod.synthetic_run(n_events, acts=acts))
