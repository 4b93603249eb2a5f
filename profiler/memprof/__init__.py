"""memprof: where did my memory go, what fits, and how to make it smaller."""
import torch  # noqa: F401  (loads libc10 before the extension)

from . import _C  # noqa: F401
from .profile import CATEGORIES, Finding, Profile, ProfileFormatError, load
from .track import Tracker, track
from .analyses import findings
from . import health, throughput  # noqa: F401  (memprof.throughput.summarize, ...)
from . import checkpoint, estimate  # noqa: F401  (memprof.checkpoint.apply, memprof.estimate)
from .estimate import estimate_step
from .recommend import recommend

__version__ = "0.1.0"

__all__ = ["track", "Tracker", "Profile", "Finding", "load", "ProfileFormatError",
           "CATEGORIES", "findings", "health", "throughput", "checkpoint", "estimate",
           "estimate_step", "recommend", "__version__"]
