"""Order statistics of a series, as every layer reports them (median with p10/p90)."""
from __future__ import annotations

import numpy as np


def describe(values) -> dict[str, float] | None:
    """median, p10, p90, min, max and n of the finite values; None when there are none."""
    a = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if a.size == 0:
        return None
    p10, med, p90 = np.percentile(a, [10, 50, 90])
    return {"median": float(med), "p10": float(p10), "p90": float(p90),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}
