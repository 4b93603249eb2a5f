"""The merged report of a distributed job in the terminal: which rank peaked, how unbalanced
the ranks are, one row per rank with its categories at its peak, and each finding once with
the ranks it was seen on."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from ..analyse.ranks import MergedRanks, rank_ranges
from ..record.events import CATEGORIES
from ..units import fmt_bytes
from .ending import NEVER_REPLACED
from .terminal import SEVERITY_STYLE

SHORT = {"optimizer_state": "optimizer", "communication": "comm."}   # narrower columns


def when(event: dict | None) -> str:
    """'step 3 backward, encoder.0 (aten::mm) at 0.42 s' for a rank's peak event."""
    if not event:
        return "-"
    return (f"step {event['step']} {event['phase']}, {event['module']} ({event['op']}) "
            f"at {event['time_s']:.2f} s")


def ordered_categories(merged: MergedRanks) -> list[str]:
    """The categories holding bytes at some rank's peak: memprof's in their usual order,
    then any other."""
    seen = [c for c in merged.categories if any(r.by_category.get(c) for r in merged.ranks)]
    return [c for c in CATEGORIES if c in seen] + [c for c in seen if c not in CATEGORIES]


def headline(merged: MergedRanks) -> str:
    top = merged.peak_row
    imb = merged.imbalance
    missing = merged.missing_ranks
    return (f"peak {fmt_bytes(top.peak)} on rank {top.rank} at {when(top.peak_event)}\n"
            f"median rank peak {fmt_bytes(merged.median_peak)}   imbalance (max/median) "
            + (f"{imb:.3f}" if imb is not None else "-")
            + (f"\nmissing ranks: {rank_ranges(missing)}" if missing else "")
            + "".join(f"\nrank {r.rank}'s tracked code raised: {r.error}"
                      for r in merged.ranks if r.error)
            + "".join(f"\nrank {r.rank}'s profile was saved while it ran ({r.unfinished_at} "
                      f"steps ended) and never replaced by its end: it was {NEVER_REPLACED}"
                      for r in merged.ranks if r.unfinished_at is not None))


def _rank_cell(merged: MergedRanks, row) -> str:
    return f"{row.rank} [bold]*[/]" if row is merged.peak_row else str(row.rank)


def print_ranks(merged: MergedRanks, console: Console | None = None, top: int = 8) -> None:
    console = console or Console()
    model = merged.profiles[0].meta.get("model_class") or "tracked code"
    title = escape(f"memprof: {model}, {len(merged.ranks)} of {merged.world_size} ranks"
                   + (f" ({merged.backend})" if merged.backend else ""))
    if merged.findings:
        t = Table(title="Findings (each once, with the ranks it was seen on)",
                  title_justify="left", show_lines=True, expand=True)
        t.add_column("severity", no_wrap=True)
        t.add_column("ranks", no_wrap=True)
        t.add_column("what", ratio=3, overflow="fold")
        t.add_column("bytes per rank", no_wrap=True)
        t.add_column("fix", ratio=2, overflow="fold")
        for f in merged.findings:
            what = ((f"[bold]held by {escape(f.holder)}[/]\n" if f.holder else "")
                    + escape(f.message))
            per_rank = "\n".join(f"{r}: {fmt_bytes(b)}" for r, b in
                                 sorted(f.bytes_by_rank.items())[:top])
            if len(f.bytes_by_rank) > top:
                per_rank += f"\n(+{len(f.bytes_by_rank) - top} ranks)"
            t.add_row(f"[{SEVERITY_STYLE.get(f.severity, '')}]{escape(f.severity)}[/]",
                      escape(f.on_ranks), what, per_rank, escape(f.fix))
        console.print(t)
    console.print(Panel.fit(escape(headline(merged)), title=title))
    med = merged.median_peak
    t = Table(title="Per rank: the peak and when", title_justify="left")
    for col in ("rank", "peak", "vs median", "at end", "steps"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("when (step phase, module (op), time)", overflow="fold")
    for r in merged.ranks:
        t.add_row(_rank_cell(merged, r), fmt_bytes(r.peak),
                  f"{r.peak / med:.3f}" if med > 0 else "-", fmt_bytes(r.end_bytes),
                  r.steps_label, escape(when(r.peak_event)))
    console.print(t)
    cats = ordered_categories(merged)
    t = Table(title="Alive at each rank's peak, by category", title_justify="left")
    t.add_column("rank", justify="right", no_wrap=True)
    for c in cats:
        t.add_column(SHORT.get(c, c), justify="right", no_wrap=True)
    for r in merged.ranks:
        t.add_row(_rank_cell(merged, r), *(fmt_bytes(r.by_category.get(c, 0)) for c in cats))
    console.print(t)
    console.print("[dim]* the rank with the highest peak. Times are seconds since that rank "
                  "started tracking. Each rank's full report: memprof report <its file>.[/]")
