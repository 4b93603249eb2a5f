"""Units for people: byte counts any layer may print (no dependency on the report layer)."""
from __future__ import annotations


def fmt_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; binary units, sign kept."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    return f"{sign}{n:.2f} TiB"
