"""memprof: where did my memory go, what fits, and how to make it smaller."""
import torch  # noqa: F401  (loads libc10 before the extension)

from . import _C  # noqa: F401
from .profile import CATEGORIES, Finding, Profile, ProfileFormatError, load
from .track import Tracker, track
from .analyses import findings

__version__ = "0.1.0"

__all__ = ["track", "Tracker", "Profile", "Finding", "load", "ProfileFormatError",
           "CATEGORIES", "findings", "__version__"]
