"""The analyses that run on every profile when a track() block exits.

Each analysis is `f(profile, tracker) -> list[Finding]`; it may look at live Python state
through the tracker (e.g. the garbage collector for retained graphs) and must not raise into
training code (track() catches and records any error).
"""
from __future__ import annotations


def default_analyses() -> list:
    return []
