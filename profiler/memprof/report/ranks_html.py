"""The merged report of a distributed job as one self-contained HTML page: each finding once
with its ranks and bytes per rank, one row per rank (peak, when, bytes by category at its
peak as a bar and as numbers), and every rank's live memory over time in one chart. Static
SVG only: the page needs no script."""
from __future__ import annotations

import numpy as np

from ..analyse.ranks import MergedRanks
from ..units import fmt_bytes
from .html import finding_card, page, table
from .ranks import TIMING_HEADER, headline, ordered_categories, timing_rows, when
from .series import envelope, t0_ns
from .svg import COLORS, LINE_COLORS, Frame, esc, fmt_time, legend, nice_bytes

LINE_BUCKETS = 300        # points per rank line: about 2 per bucket, peaks kept
OTHER_COLOR = "#9ca3af"   # a category without a colour of its own


def _color(category: str) -> str:
    return COLORS.get(category, OTHER_COLOR)


def _findings(merged: MergedRanks) -> str:
    if not merged.findings:
        return '<section id="findings"><h2>Findings</h2><p class="ok">None on any rank.</p>' \
               '</section>'
    cards = []
    for f in merged.findings:
        facts = [("ranks", ", ".join(map(str, f.ranks)))]
        if f.holder:
            facts.append(("held by", f.holder))
        facts += [(f"bytes on rank {r}", fmt_bytes(b)) for r, b in sorted(f.bytes_by_rank.items())]
        cards.append(finding_card(f, f"{f.severity}: {f.kind} {f.on_ranks}", facts,
                                  f' data-ranks="{esc(",".join(map(str, f.ranks)))}"'))
    return f'<section id="findings"><h2>Findings</h2>{"".join(cards)}</section>'


def _bar(by_category: dict[str, int], cats: list[str], scale: float, width: int = 220) -> str:
    """One rank's bytes at its peak as a stacked horizontal bar (scale: px per byte)."""
    x, parts = 0.0, []
    for c in cats:
        b = by_category.get(c, 0)
        if b <= 0:
            continue
        w = b * scale
        parts.append(f'<rect x="{x:.1f}" y="0" width="{max(w, 0.5):.1f}" height="14" '
                     f'fill="{_color(c)}"><title>{esc(c)} {esc(fmt_bytes(b))}</title></rect>')
        x += w
    return (f'<svg class="rank-bar" viewBox="0 0 {width} 14" width="{width}" height="14" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>')


def _rank_table(merged: MergedRanks) -> str:
    cats = ordered_categories(merged)
    top, med = merged.peak_row, merged.median_peak
    scale = 220 / max(1, top.peak)
    header = ("rank", "peak", "vs median", "when (step phase, module (op), time)",
              "at the peak", *cats, "at end", "steps")
    rows = []
    for r in merged.ranks:
        cells = [f"{r.rank}{' *' if r is top else ''}",
                 f'<span data-bytes="{r.peak}">{esc(fmt_bytes(r.peak))}</span>',
                 f"{r.peak / med:.3f}" if med > 0 else "-", esc(when(r.peak_event)),
                 _bar(r.by_category, cats, scale)]
        cells += [f'<span data-category="{esc(c)}" data-bytes="{r.by_category.get(c, 0)}">'
                  f"{esc(fmt_bytes(r.by_category.get(c, 0)))}</span>" for c in cats]
        cells += [esc(fmt_bytes(r.end_bytes)), esc(r.steps_label)]
        rows.append(cells)
    attrs = [f' data-rank="{r.rank}"' for r in merged.ranks]
    return (f'<section id="ranks"><h2>Ranks</h2>'
            f'{legend({c: _color(c) for c in cats})}'
            f'{table(rows, header, "ranks", raw=True, row_attrs=attrs)}'
            f'<p class="hint">* the rank with the highest peak. Times are '
            f"seconds since that rank started tracking; bars share one scale.</p></section>")


def _timing_table(merged: MergedRanks) -> str:
    """Per rank: time per step, own work, communication and samples/s (report.ranks)."""
    rows = timing_rows(merged)
    if not rows:
        return ""
    attrs = [f' data-timing-rank="{r.rank}"' for r in merged.ranks]
    return (f'<section id="timing"><h2>Time per step</h2>'
            f'{table(rows, TIMING_HEADER, "timing", row_attrs=attrs)}'
            f'<p class="hint">Medians after warm-up. Own work: the step less the time with a '
            f"collective in flight; the slowest rank has the most, and the others wait for it "
            f"in communication.</p></section>")


def _timelines(merged: MergedRanks) -> str:
    """Live bytes over time, one line per rank (each from its own start)."""
    lines = []
    for p in merged.profiles:
        mem = p.memory
        if mem.size == 0:
            continue
        keep = [p.peak_index, 0]
        idx = envelope(mem["t_ns"], p.live_bytes(), LINE_BUCKETS, keep)
        t_us = (mem["t_ns"][idx].astype(np.int64) - t0_ns(p)) // 1000
        lines.append((int(p.meta["rank"]), t_us, p.live_bytes()[idx]))
    if not lines:
        return ""
    t_end = max(int(t[-1]) for _, t, _ in lines) + 1
    fr = Frame(960, 280, t_end, nice_bytes(merged.peak_row.peak), bottom=30)
    out = [fr.axes(fmt_time)]
    colors = {}
    for k, (rank, t, v) in enumerate(lines):
        color = colors[f"rank {rank}"] = LINE_COLORS[k % len(LINE_COLORS)]
        xs, ys = fr.x(t).astype(int), fr.y(v).astype(int)
        pts = " ".join(f"{x},{y}" for x, y in zip(xs.tolist(), ys.tolist()))
        out.append(f'<polyline class="rank-line" data-rank="{rank}" fill="none" '
                   f'stroke="{color}" stroke-width="1.5" points="{pts}">'
                   f"<title>rank {rank}</title></polyline>")
    return (f'<section id="timeline"><h2>Live memory over time, per rank</h2>{legend(colors)}'
            f'<svg viewBox="0 0 {fr.w} {fr.h}" width="100%" role="img" '
            f'aria-label="live memory per rank over time" xmlns="http://www.w3.org/2000/svg">'
            f'{"".join(out)}</svg><p class="hint">Downsampled: each time bucket keeps its '
            f"highest and lowest point, so every peak is drawn at its true height.</p></section>")


def ranks_html(merged: MergedRanks) -> str:
    model = merged.profiles[0].meta.get("model_class") or "run"
    what = (f"{model}, {len(merged.ranks)} of {merged.world_size} ranks"
            + (f" ({merged.backend})" if merged.backend else ""))
    lead = "<br>".join(esc(line) for line in headline(merged).splitlines())
    body = (f"<header><h1>memprof: {esc(what)}</h1><p class=lead id=headline "
            f'data-peak-rank="{merged.peak_row.rank}">{lead}</p>'
            f'<nav><a href="#findings">Findings</a> <a href="#ranks">Ranks</a> '
            f'<a href="#timing">Time per step</a> '
            f'<a href="#timeline">Memory over time</a></nav></header><main>'
            + _findings(merged) + _rank_table(merged) + _timing_table(merged)
            + _timelines(merged)
            + "</main><footer>memprof merged report; self-contained, no network. Each rank's "
              "full report: <code>memprof report &lt;its file&gt; --export r.html</code>."
              "</footer>")
    return page(f"memprof: {what}", body)
