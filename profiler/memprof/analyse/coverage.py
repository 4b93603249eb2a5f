"""What a profile's figures leave out because of how it was recorded, in words every report
prints: a `track()` without a model read "parameters 0 B" and "module <outside modules>" at
the peak with no word why."""
from __future__ import annotations

import numpy as np

from ..profile import Profile
from ..record.events import CAT_GRADIENTS, CAT_PARAMETERS


def model_not_given(profile: Profile) -> str | None:
    """The sentence for a block given no model, or None (a model given; an old profile)."""
    how = profile.meta.get("modules_named")
    if how not in ("none", "as they ran"):
        return None
    allocated = profile.memory["size"] > 0
    cats = np.bincount(profile.category[allocated].astype(np.int64),
                       minlength=max(CAT_PARAMETERS, CAT_GRADIENTS) + 1)
    # gradients were made for parameters the block never saw made: built before it
    before = bool(cats[CAT_GRADIENTS]) and not cats[CAT_PARAMETERS]
    if how == "none":
        return ("No model was given to track(): memory is not attributed to modules and "
                "forward passes are not seen"
                + (", and the parameters, made before the block, are not counted" if before
                   else "") + ". Pass it: track(model).")
    if before:   # auto mode (track(auto_modules=True)) over a model built before the block
        return ("The parameters were made before the block and are not counted; "
                "track(model) counts them.")
    return None
