"""What a REPL or a notebook shows for a profile: one line of the run (repr), or the terminal
report as an HTML fragment with inline styles (Jupyter's _repr_html_: no document, no
page-wide style or script, so nothing of the notebook's own page changes)."""
from __future__ import annotations

import io

from rich.console import Console

from ..units import fmt_bytes
from .terminal import print_report

#: the report's width in a notebook cell (characters)
WIDTH = 110
_PRE = ('<pre style="font-family: Menlo, \'DejaVu Sans Mono\', Consolas, monospace; '
        'font-size: 12px; line-height: 1.3; white-space: pre; overflow-x: auto">{code}</pre>')


def one_line(prof) -> str:
    """`<memprof profile: MLP on cpu, peak 1.2 MiB at step 3, backward, 4 steps, ...>`."""
    pe = prof.peak_event
    where = f" at step {pe['step']}, {pe['phase']}" if pe else ""
    kinds = sorted({f.kind for f in prof.findings})
    found = (f"{len(prof.findings)} finding(s): {', '.join(kinds)}" if kinds
             else "no findings")
    rank = (f", rank {prof.meta['rank']} of {prof.meta.get('world_size')}"
            if prof.meta.get("rank") is not None else "")
    return (f"<memprof profile: {prof.meta.get('model_class') or 'tracked code'} on "
            f"{prof.device}{rank}, peak {fmt_bytes(prof.peak)}{where}, {prof.steps_label} "
            f"steps, {prof.memory.size:,} events, {found}; prof.report() for the report>")


def html_fragment(prof) -> str:
    """The terminal report (memprof.show), recorded and exported with inline styles."""
    console = Console(record=True, width=WIDTH, file=io.StringIO(), force_terminal=True,
                      force_jupyter=False, color_system="truecolor")
    print_report(prof, console=console)
    return console.export_html(inline_styles=True, code_format=_PRE)
