"""`Finding`: something worth the user's attention, as the analyses state it and reports show it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass
class Finding:
    kind: str
    severity: str             # "error" | "warning" | "info"
    bytes: int
    message: str
    fix: str
    holder: str | None = None
    evidence: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Most severe first, then the most bytes."""
    return sorted(findings, key=lambda f: (SEVERITY_ORDER.get(f.severity, 9), -f.bytes))
