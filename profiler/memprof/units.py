"""Units for people: byte counts any layer may print (no dependency on the report layer)."""
from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def fmt_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; binary units, sign kept. The unit is chosen after rounding, so
    1048575 bytes read '1.00 MiB', not '1024.00 KiB'."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in _UNITS:
        if unit == "B" and n < 1024:
            return f"{sign}{n:.0f} B"
        if unit != "B" and (round(n, 2) < 1024 or unit == _UNITS[-1]):
            return f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
