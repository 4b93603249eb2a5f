"""The merged report of a distributed job in the terminal: which rank peaked, how unbalanced
the ranks are, one row per rank with its categories at its peak, one with its time per step
(the slowest rank and those that wait for it named), which rank failed first, and each
finding once with the ranks it was seen on."""
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

SHORT = {"optimizer_state": "optimizer", "communication": "comm.",
         "recomputed_weights": "recomputed"}   # narrower columns


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


def _errors_first_one_first(merged: MergedRanks, first: int | None) -> list:
    return sorted((r for r in merged.ranks if r.error), key=lambda r: (r.rank != first, r.rank))


def failure_line(merged: MergedRanks) -> str:
    """'\nfirst to fail: rank 1 (why we say so)', or where it cannot be told, why not."""
    ff = merged.first_failure
    failed = sum(1 for r in merged.ranks if r.error or r.unfinished_at is not None)
    if not ff or failed <= 1:
        return ""   # (one failing rank: its line says it all)
    if ff["rank"] is None:
        return f"\nwhich rank failed first: {ff['basis']}"
    return f"\nfirst to fail: rank {ff['rank']} ({ff['basis']})"


def straggler_line(merged: MergedRanks) -> str:
    """'\nslowest rank 1: 45.0 ms of its own work per step (4.1x rank 0's); rank 0 waits for
    it (communication in flight 68.5 % of its time)', where one rank holds the others back."""
    st = merged.stragglers
    if not st or not st["straggler"]:
        return ""
    timing = {r.rank: r.timing for r in merged.ranks}
    ratio = st["ratio_to_fastest"]
    waits = ", ".join(f"rank {w} ({_pct(timing[w]['comm_share'])} of its time with a "
                      "collective in flight)" for w in st["waiting_ranks"])
    return (f"\nslowest rank {st['slowest_rank']}: {st['own_work_ms']:.1f} ms of its own work "
            f"per step (no collective in flight)"
            + (f", {ratio:.1f}x the fastest rank's" if ratio else "")
            + (f"; waiting for it: {waits}" if waits else ""))


def _pct(share) -> str:
    return f"{100 * share:.1f} %" if share is not None else "-"


def _ms(value) -> str:
    return f"{value:.2f}" if value is not None else "-"


def headline(merged: MergedRanks) -> str:
    first = (merged.first_failure or {}).get("rank")
    top = merged.peak_row
    imb = merged.imbalance
    missing = merged.missing_ranks
    return (f"peak {fmt_bytes(top.peak)} on rank {top.rank} at {when(top.peak_event)}\n"
            f"median rank peak {fmt_bytes(merged.median_peak)}   imbalance (max/median) "
            + (f"{imb:.3f}" if imb is not None else "-")
            + (f"\nmissing ranks: {rank_ranges(missing)}" if missing else "")
            + "".join(f"\nrank {r.rank}'s tracked code raised: {r.error}"
                      + (" (failed first)" if r.rank == first else "")
                      for r in _errors_first_one_first(merged, first))
            + failure_line(merged)
            + straggler_line(merged)
            + "".join(f"\nrank {r.rank}'s profile was saved while it ran ({r.unfinished_at} "
                      f"steps ended) and never replaced by its end: it was {NEVER_REPLACED}"
                      for r in merged.ranks if r.unfinished_at is not None))


def _rank_cell(merged: MergedRanks, row) -> str:
    return f"{row.rank} [bold]*[/]" if row is merged.peak_row else str(row.rank)


def timing_rows(merged: MergedRanks) -> list[tuple[str, ...]]:
    """Per rank: step ms, own work ms, communication ms and share, samples/s, steps measured
    (the medians of each rank's throughput summary); none where no rank has a step."""
    if not any(r.timing for r in merged.ranks):
        return []
    st = merged.stragglers or {}
    out = []
    for r in merged.ranks:
        t = r.timing or {}
        mark = (" slowest" if st.get("straggler") and r.rank == st.get("slowest_rank") else
                " waits" if r.rank in st.get("waiting_ranks", ()) else "")
        rate = t.get("samples_per_s")
        out.append((f"{r.rank}{mark}", _ms(t.get("step_ms")), _ms(t.get("own_work_ms")),
                    _ms(t.get("comm_ms")), _pct(t.get("comm_share")),
                    f"{rate:.1f}" if rate is not None else "-",
                    str(t.get("steps_measured", "-"))))
    return out


TIMING_HEADER = ("rank", "step ms", "own work ms", "comm. ms", "comm. share", "samples/s",
                 "steps measured")


def _print_timing(merged: MergedRanks, console: Console) -> None:
    rows = timing_rows(merged)
    if not rows:
        return
    t = Table(title="Per rank: time per step (medians after warm-up)", title_justify="left")
    for col in TIMING_HEADER:
        t.add_column(col, justify="right" if col != "rank" else "left", no_wrap=True)
    for row in rows:
        t.add_row(*map(escape, row))
    console.print(t)
    console.print("[dim]own work: the step less the time with a collective in flight; the "
                  "slowest rank has the most, and the others wait for it in communication "
                  "(each rank's share of its measured time).[/]")


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
    _print_timing(merged, console)
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
