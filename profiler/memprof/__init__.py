"""memprof: where did my memory go, what fits, and how to make it smaller.

The flow: the user's code -> record (memprof.record) -> Run -> Profile (queries) -> analyse
-> report; plan (what fits) runs the same recording core on fake tensors. See ARCHITECTURE.md.
"""
import torch  # noqa: F401  (loads libc10 before the extension)

from . import _C  # noqa: F401
from .analyse import findings
from .finding import Finding
from .profile import Profile, load
from .profile_file import ProfileFormatError
from .record.events import CATEGORIES
from .track import Tracker, track

__version__ = "0.1.0"

#: the planning side loads on first use: most sessions only track, and the plan modules pull
#: in torch.distributed and fake-tensor machinery (~0.5 s of import on a 2-core machine)
_LAZY = {"checkpoint": ("plan.checkpoint", None), "estimate": ("plan.estimate", None),
         "estimate_step": ("plan.estimate", "estimate_step"),
         "recommend": ("plan.search", "recommend")}


_SUBPACKAGES = ("plan", "models", "report", "integrations", "cli", "demo")


def __getattr__(name: str):
    import importlib
    if name in _SUBPACKAGES:      # memprof.plan.gpus... without importing it first
        return importlib.import_module(f".{name}", __name__)
    if name not in _LAZY:
        raise AttributeError(f"module 'memprof' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(f".{module_name}", __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def show(obj, console=None, **options) -> None:
    """Print a profile's report (findings first, then the peak) or a plan's table.
    (Named show: `memprof.report` is the package of reporters.)"""
    from .report import show
    show(getattr(obj, "profile", None) or obj, console=console, **options)


def export(obj, path: str) -> str:
    """Export a profile by extension: .json (Chrome/Perfetto trace), .pickle (PyTorch memory
    snapshot), .html (self-contained report); a plan (memprof.recommend) as .html or .json."""
    from .report import export as export_to
    return export_to(getattr(obj, "profile", None) or obj, path)


__all__ = ["track", "Tracker", "Profile", "Finding", "load", "ProfileFormatError",
           "CATEGORIES", "findings", "checkpoint", "estimate", "estimate_step", "recommend",
           "show", "export", "__version__"]
