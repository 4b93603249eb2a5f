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
from .plan import checkpoint, estimate  # noqa: F401  (memprof.checkpoint.apply, ...)
from .plan.estimate import estimate_step
from .plan.search import recommend

__version__ = "0.1.0"


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
