"""What an analysis may return besides its findings."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..finding import Finding


@dataclass
class Outcome:
    findings: list[Finding]
    notes: list[str] = field(default_factory=list)   # what could not be fully checked
    stats: dict = field(default_factory=dict)        # e.g. how long the check took
