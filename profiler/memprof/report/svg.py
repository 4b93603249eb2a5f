"""Hand-written SVG for the HTML reports: every chart is drawn here, in Python, so the page
shows it without JavaScript (report/assets/report.js only adds zoom, pan and hover).

Coordinates are whole pixels of the chart's viewBox; each element says what it shows in a
<title> (the browser's tooltip) and in data-* attributes that tests read back.
"""
from __future__ import annotations

import html
import math

import numpy as np

from ..units import fmt_bytes

COLORS = {"parameters": "#4e79a7", "gradients": "#f28e2c", "optimizer_state": "#59a14f",
          "activations": "#e15759", "temporaries": "#edc949", "other": "#bab0ab",
          "communication": "#76b7b2", "buffers": "#b07aa1",
          "recomputed_weights": "#9c755f"}
PHASE_COLORS = {"forward": "#4e79a7", "backward": "#f28e2c", "optimizer": "#59a14f"}
LINE_COLORS = ("#4e79a7", "#e15759", "#59a14f", "#b07aa1", "#f28e2c", "#76b7b2", "#9c755f",
               "#ff9da7", "#edc949", "#bab0ab")
DASHES = ("", "6 3", "2 3", "8 3 2 3", "1 2")


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def nice_ceil(x: float) -> float:
    """1, 2, 2.5, 5 x 10^k at or above x (an axis maximum)."""
    if x <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * e >= x:
            return m * e
    return 10 * e


def nice_bytes(x: float) -> float:
    """An axis maximum for bytes: 1, 2, 2.5 or 5 x 10^k of the binary unit (KiB, MiB...)
    that x is shown in, so the ticks read 512 KiB, 1 MiB, ... rather than 488.28 KiB."""
    unit = 1
    while x >= 1024 * unit and unit < 1024 ** 4:
        unit *= 1024
    return nice_ceil(x / unit) * unit


def fmt_time(us: float) -> str:
    if us >= 60e6:
        return f"{us / 60e6:.1f} min"
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    if us >= 1e3:
        return f"{us / 1e3:.1f} ms"
    return f"{us:.0f} us"


class Frame:
    """The plot area of a chart: data -> pixel transforms and axes."""

    def __init__(self, width, height, x_max, y_max, left=70, right=12, top=12, bottom=26):
        self.w, self.h = width, height
        self.left, self.right, self.top, self.bottom = left, right, top, bottom
        self.x_max, self.y_max = max(x_max, 1e-9), max(y_max, 1)

    @property
    def pw(self) -> int:
        return self.w - self.left - self.right

    @property
    def ph(self) -> int:
        return self.h - self.top - self.bottom

    def x(self, v) -> np.ndarray:
        return np.rint(self.left + np.asarray(v, dtype=np.float64) / self.x_max * self.pw)

    def y(self, v) -> np.ndarray:
        return np.rint(self.top + self.ph - np.asarray(v, dtype=np.float64) / self.y_max
                       * self.ph)

    def axes(self, x_label, y_fmt=fmt_bytes, x_ticks=None) -> str:
        out = ['<g class="axes" font-size="11" fill="#444">']
        for k in range(5):
            v = self.y_max * k / 4
            y = int(self.y(v))
            out.append(f'<line x1="{self.left}" x2="{self.w - self.right}" y1="{y}" y2="{y}" '
                       f'stroke="#e5e5e5"/><text x="{self.left - 4}" y="{y + 4}" '
                       f'text-anchor="end">{esc(y_fmt(v))}</text>')
        ticks = x_ticks if x_ticks is not None else [self.x_max * k / 5 for k in range(6)]
        for v, label in ((t if isinstance(t, tuple) else (t, x_label(t))) for t in ticks):
            x = int(self.x(v))
            anchor = "end" if x > self.w - 40 else "middle"
            out.append(f'<text x="{x}" y="{self.h - 8}" text-anchor="{anchor}">{esc(label)}'
                       f'</text>')
        out.append("</g>")
        return "".join(out)


def stacked_paths(fr: Frame, t: np.ndarray, by_cat: np.ndarray, names, t_end) -> str:
    """One step-shaped area per category (value i holds from t[i] to t[i+1]), stacked in
    the order of `names`; empty categories are left out."""
    xs = fr.x(t).astype(np.int64)
    x_end = int(fr.x(t_end))
    base = np.zeros(t.size, dtype=np.int64)
    out = []
    for k, name in enumerate(names):
        col = by_cat[:, k]
        if not col.any():
            continue
        top = base + col
        yt, yb = fr.y(top).astype(np.int64), fr.y(base).astype(np.int64)
        out.append(f'<path class="layer" data-category="{esc(name)}" fill="{COLORS[name]}" '
                   f'd="{_step_area(xs, yt, yb, x_end)}"><title>{esc(name)}</title></path>')
        base = top
    return "".join(out)


def _step_area(xs: np.ndarray, yt: np.ndarray, yb: np.ndarray, x_end: int) -> str:
    """Path of the area between two step functions over the same x positions."""
    nxt = np.append(xs[1:], x_end)
    top = [f"M{xs[0]},{yb[0]}"]
    for x, y, x2 in zip(xs.tolist(), yt.tolist(), nxt.tolist()):
        top.append(f"V{y}H{x2}")
    bottom = []
    for x, y, x2 in zip(xs.tolist()[::-1], yb.tolist()[::-1], nxt.tolist()[::-1]):
        bottom.append(f"V{y}H{x}")
    return "".join(top) + "".join(bottom) + "Z"


def bands(fr: Frame, spans, y0: int, height: int, color_of, title_of, cls: str) -> str:
    """Rectangles over time spans (steps, phases); spans narrower than a pixel are left out
    (a run of thousands of steps shows them when zoomed in, in the page's script)."""
    out = []
    for span in spans:
        x0, x1 = int(fr.x(span[0])), int(fr.x(span[1]))
        if x1 - x0 < 1:
            continue
        out.append(f'<rect class="{cls}" x="{x0}" y="{y0}" width="{x1 - x0}" '
                   f'height="{height}" fill="{color_of(span)}"><title>{esc(title_of(span))}'
                   f'</title></rect>')
    return "".join(out)


def marker(fr: Frame, x_value, label: str, color="#b91c1c", cls="peak") -> str:
    x = int(fr.x(x_value))
    anchor = "end" if x > fr.w * 0.7 else "start"
    dx = -4 if anchor == "end" else 4
    return (f'<g class="{cls}"><line x1="{x}" x2="{x}" y1="{fr.top}" y2="{fr.top + fr.ph}" '
            f'stroke="{color}" stroke-dasharray="4 3"/><text x="{x + dx}" y="{fr.top + 12}" '
            f'fill="{color}" font-size="12" text-anchor="{anchor}">{esc(label)}</text></g>')


# ------------------------------------------------------------------ module icicle
MAX_ICICLE_DEPTH = 40    # levels below the root: deeper than any real model's tree


def icicle(nodes: list[dict], width=960, row=24, max_depth=MAX_ICICLE_DEPTH, min_px=2) -> str:
    """Icicle of a module tree: `nodes` are dicts name, label, depth, total, by_category,
    children (indices), the root first. Width is bytes; a stripe under each node shows its
    bytes by category. Modules deeper than `max_depth` are not drawn, and the chart says so
    (it stopped at depth 6 without a word: BERT's attention.self never showed)."""
    if not nodes or nodes[0]["total"] <= 0:
        return "<p>Nothing was alive at the peak.</p>"
    scale = width / nodes[0]["total"]
    out, depth_seen, cut = [], 0, False
    stack = [(0, 0.0)]
    while stack:
        i, x = stack.pop()
        n = nodes[i]
        w = n["total"] * scale
        if w < min_px:
            continue
        if n["depth"] > max_depth:
            cut = True
            continue
        depth_seen = max(depth_seen, n["depth"])
        y = n["depth"] * row
        out.append(_icicle_node(n, x, y, w, row))
        cx = x
        for c in n["children"]:
            stack.append((c, cx))
            cx += nodes[c]["total"] * scale
    height = (depth_seen + 1) * row
    if cut:
        out.append(f'<text class="cut" x="0" y="{height + 13}" font-size="11" fill="#6b7280">'
                   f"modules more than {max_depth} levels deep are not drawn</text>")
        height += row
    return (f'<svg class="icicle" viewBox="0 0 {width} {height}" width="100%" '
            f'role="img" aria-label="modules at the peak" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(out)}</svg>')


def _icicle_node(n: dict, x: float, y: int, w: float, row: int) -> str:
    cats = n["by_category"]
    title = f"{n['name']}: {fmt_bytes(n['total'])} (self {fmt_bytes(n['self'])})\n" + \
        "\n".join(f"  {k}: {fmt_bytes(v)}" for k, v in cats.items() if v)
    parts = [f'<g class="node" data-module="{esc(n["name"])}" data-bytes="{n["total"]}">'
             f'<title>{esc(title)}</title>'
             f'<rect x="{x:.1f}" y="{y}" width="{max(w - 1, 0.5):.1f}" height="{row - 6}" '
             f'fill="#dbe4f0" stroke="#fff"/>']
    cx = x
    for k, v in cats.items():
        if v > 0 and n["total"] > 0:
            cw = (w - 1) * v / n["total"]
            parts.append(f'<rect x="{cx:.1f}" y="{y + row - 6}" width="{max(cw, 0):.1f}" '
                         f'height="4" fill="{COLORS[k]}"/>')
            cx += cw
    if w > 40:
        label = n["label"]
        room = int(w / 6.5)
        label = label if len(label) <= room else label[:max(room - 1, 1)] + "\u2026"
        parts.append(f'<text x="{x + 3:.1f}" y="{y + 13}" font-size="11">{esc(label)}</text>')
    parts.append("</g>")
    return "".join(parts)


# ------------------------------------------------------------------ bars and lines
def stacked_bars(rows: list[tuple[str, dict[str, float]]], colors: dict, unit: str,
                 width=960, height=200) -> str:
    """One stacked bar per row (label, {part: value})."""
    if not rows:
        return ""
    top = max(sum(v for v in parts.values() if v) for _, parts in rows) or 1
    fr = Frame(width, height, len(rows), nice_ceil(top), left=60)
    labelled = fr.pw / len(rows) >= 40
    bw = max(1.0, fr.pw / len(rows) * 0.8)
    out = [f'<svg class="bars" viewBox="0 0 {width} {height}" width="100%" '
           f'xmlns="http://www.w3.org/2000/svg">',
           fr.axes(lambda v: "", y_fmt=lambda v: f"{v:.4g} {unit}", x_ticks=[])]
    for k, (label, parts) in enumerate(rows):
        base = 0.0
        x = float(fr.x(k + 0.1))
        for name, v in parts.items():
            if not v:
                continue
            y0, y1 = int(fr.y(base)), int(fr.y(base + v))
            out.append(f'<rect x="{x:.1f}" y="{y1}" width="{bw:.1f}" height="{max(y0 - y1, 1)}"'
                       f' fill="{colors[name]}"><title>{esc(label)}: {esc(name)} '
                       f'{v:.4g} {unit}</title></rect>')
            base += v
        if labelled:
            out.append(f'<text x="{x + bw / 2:.1f}" y="{height - 8}" font-size="11" '
                       f'text-anchor="middle">{esc(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def legend(items: dict[str, str], cls="legend") -> str:
    return f'<div class="{cls}">' + "".join(
        f'<span data-key="{esc(k)}"><i style="background:{c}"></i>{esc(k)}</span>'
        for k, c in items.items()) + "</div>"
