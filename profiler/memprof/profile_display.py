"""How a profile shows itself where a REPL or a notebook prints it (the last line of a cell):
the report layer draws it, reached through the package root as the other consumers are."""
from __future__ import annotations


class Displayed:
    """Profile's __repr__ (one line of the run) and _repr_html_ (Jupyter: the report)."""

    def __repr__(self) -> str:
        import memprof  # the package root dispatches to the report layer
        return memprof.report.describe(self)

    def _repr_html_(self) -> str:
        import memprof
        return memprof.report.describe(self, html=True)
