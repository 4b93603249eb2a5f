"""The rich terminal report: findings first, then the peak and what was alive at it."""
from __future__ import annotations

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from ..profile import CATEGORIES, Profile

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def fmt_bytes(n: float) -> str:
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    return f"{sign}{n:.2f} TiB"


def _share(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole else "   -  "


def print_report(prof: Profile, console: Console | None = None, top: int = 8) -> None:
    console = console or Console()
    s_peak = prof.peak
    title = f"memprof: {prof.meta.get('model_class') or 'tracked code'} on {prof.device}"
    if prof.meta.get("error"):
        console.print(f"[bold red]The tracked code raised:[/] {prof.meta['error']}")
    for oom in prof.oom_events:
        console.print(f"[bold red]Out of memory[/] on {oom['device']}: tried to allocate "
                      f"{fmt_bytes(oom['requested'])} with {fmt_bytes(oom['total_allocated'])} "
                      f"allocated, {fmt_bytes(oom['total_reserved'])} reserved")
    if prof.findings:
        t = Table(title="Findings", title_justify="left", show_lines=True, expand=True)
        t.add_column("severity", no_wrap=True)
        t.add_column("what", ratio=3, overflow="fold")
        t.add_column("bytes", justify="right", no_wrap=True)
        t.add_column("fix", ratio=2, overflow="fold")
        for f in prof.findings:
            what = (f"[bold]held by {f.holder}[/]\n" if f.holder else "") + f.message
            t.add_row(f"[{SEVERITY_STYLE.get(f.severity, '')}]{f.severity}[/]", what,
                      fmt_bytes(f.bytes), f.fix)
        console.print(t)
    pe = prof.peak_event
    where = "-"
    if pe:
        where = (f"step {pe['step']}, {pe['phase']}, module [bold]{pe['module']}[/], "
                 f"op {pe['op']}" + (f", autograd node {pe['node']}" if pe['node'] else ""))
    console.print(Panel.fit(
        f"[bold]peak live memory[/] {fmt_bytes(s_peak)}   at {where}\n"
        f"events {prof.memory.size:,}   steps {len(prof.steps)}   "
        f"dropped events {prof.meta.get('dropped', 0)}", title=title))

    cat = prof.breakdown("category")
    t = Table(title="Alive at the peak, by category", title_justify="left")
    t.add_column("category")
    t.add_column("bytes", justify="right")
    t.add_column("share", justify="right")
    for name in CATEGORIES:
        t.add_row(name, fmt_bytes(cat.get(name, 0)), _share(cat.get(name, 0), s_peak))
    console.print(t)

    for by, label in (("module", "module (self)"), ("op", "op that allocated")):
        rows = list(prof.breakdown(by).items())[:top]
        t = Table(title=f"Alive at the peak, by {label}", title_justify="left")
        t.add_column(by)
        t.add_column("bytes", justify="right")
        t.add_column("share", justify="right")
        for name, b in rows:
            t.add_row(name, fmt_bytes(b), _share(b, s_peak))
        console.print(t)

    saved = list(prof.saved_by_node.items())[:top]
    if saved:
        t = Table(title="Saved for backward, released by autograd node (per run)",
                  title_justify="left")
        t.add_column("autograd node")
        t.add_column("bytes", justify="right")
        for name, b in saved:
            t.add_row(name, fmt_bytes(b))
        console.print(t)

    steps = prof.steps
    if steps:
        t = Table(title="Steps", title_justify="left")
        for col in ("step", "peak", "live at end", "allocated"):
            t.add_column(col, justify="right")
        shown = steps if len(steps) <= 2 * top else steps[:top] + steps[-top:]
        for s in shown:
            t.add_row(str(s.index), fmt_bytes(s.peak), fmt_bytes(s.live_at_end),
                      fmt_bytes(s.allocated))
        console.print(t)
    errors = prof.meta.get("analysis_errors")
    if errors:
        console.print("[yellow]Some checks could not run:[/] " + "; ".join(errors))
