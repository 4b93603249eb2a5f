"""Exports of a Profile for other tools, chosen by file extension.

.json    Chrome / Perfetto trace: a live-bytes counter, phase spans and step markers
.pickle  PyTorch memory-snapshot format (device_traces), opens in pytorch.org/memory_viz
.html    a self-contained report (tables and an SVG timeline), no network needed
"""
from __future__ import annotations

import html
import json
import pickle

import numpy as np

from ..profile import Profile
from ..record.events import CATEGORIES
from ..units import fmt_bytes

MAX_COUNTER_POINTS = 20_000
PHASE_SPANS = (("forward_start", "forward_end", "forward"),
               ("backward_start", "optimizer_start", "backward"),
               ("optimizer_start", "step", "optimizer"))


def export(profile: Profile, path: str) -> str:
    lower = path.lower()
    if lower.endswith(".json"):
        data = json.dumps(chrome_trace(profile))
        mode = "w"
    elif lower.endswith(".pickle") or lower.endswith(".pkl"):
        data = pickle.dumps(memory_snapshot(profile))
        mode = "wb"
    elif lower.endswith(".html"):
        data = html_report(profile)
        mode = "w"
    else:
        raise ValueError(f"{path}: unknown export format; expected a .json, .pickle or .html "
                         "file name")
    with open(path, mode) as f:
        f.write(data)
    return path


def _downsample(n: int, keep: int) -> np.ndarray:
    """Indices of about MAX_COUNTER_POINTS events, always including `keep` (the peak; -1: none)
    so a plotted line reaches the peak its label names."""
    if n <= MAX_COUNTER_POINTS:
        return np.arange(n)
    idx = np.linspace(0, n - 1, MAX_COUNTER_POINTS).astype(np.int64)
    return np.union1d(idx, [keep]) if keep >= 0 else np.unique(idx)


def chrome_trace(profile: Profile) -> dict:
    t0 = profile.meta.get("t0_ns", 0)
    mem = profile.memory
    live = profile.live_bytes()
    idx = _downsample(mem.size, profile.peak_index)
    events = [{"name": "live bytes", "ph": "C", "pid": 0, "tid": 0,
               "ts": (int(mem["t_ns"][i]) - t0) / 1e3, "args": {"bytes": int(live[i])}}
              for i in idx]
    marks = profile.markers()
    for start, end, name in PHASE_SPANS:
        starts = [m for m in marks if m["label"] == start]
        ends = [m for m in marks if m["label"] == end]
        for s in starts:
            e = next((e for e in ends if e["t_ns"] >= s["t_ns"]), None)
            if e is not None:
                events.append({"name": name, "ph": "X", "pid": 0, "tid": 1,
                               "ts": (s["t_ns"] - t0) / 1e3, "dur": (e["t_ns"] - s["t_ns"]) / 1e3})
    for m in marks:
        if m["label"] == "step":
            events.append({"name": f"step {m['value']}", "ph": "i", "s": "g", "pid": 0,
                           "tid": 1, "ts": (m["t_ns"] - t0) / 1e3})
    if profile.peak_index >= 0:
        pe = profile.peak_event
        events.append({"name": "peak", "ph": "i", "s": "g", "pid": 0, "tid": 0,
                       "ts": (int(mem["t_ns"][profile.peak_index]) - t0) / 1e3, "args": pe})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"memprof": profile.summary()["meta"]}}


def memory_snapshot(profile: Profile) -> dict:
    """The allocation trace in the layout torch.cuda.memory._snapshot() uses."""
    mem = profile.memory
    trace = []
    for i in range(mem.size):
        e = mem[i]
        d = profile.describe_event(i)
        trace.append({
            "action": "alloc" if e["size"] > 0 else "free_completed",
            "addr": int(e["ptr"]), "size": abs(int(e["size"])), "stream": 0,
            "time_us": int(e["t_ns"]) // 1000,
            "frames": [{"filename": d["module"], "line": int(d["step"]),
                        "name": f"{d['op']} [{d['phase']}, "
                                f"{CATEGORIES[int(profile.category[i])]}]"}]})
    return {"segments": [], "device_traces": [trace]}


def _svg_timeline(profile: Profile, width=900, height=220) -> str:
    live = profile.live_bytes()
    if live.size == 0:
        return "<p>No allocations were recorded.</p>"
    idx = _downsample(live.size, profile.peak_index)
    xs = idx / max(1, live.size - 1) * (width - 60) + 50
    top = max(1, int(live.max()))
    ys = height - 20 - live[idx] / top * (height - 40)
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
    px = profile.peak_index / max(1, live.size - 1) * (width - 60) + 50
    return (f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
            f'<polyline fill="none" stroke="#2563eb" stroke-width="1.5" points="{pts}"/>'
            f'<line x1="{px:.1f}" x2="{px:.1f}" y1="10" y2="{height - 20}" stroke="#dc2626" '
            f'stroke-dasharray="4"/><text x="{px + 4:.1f}" y="20" fill="#dc2626" '
            f'font-size="12">peak {html.escape(fmt_bytes(profile.peak))}</text>'
            f'<text x="5" y="20" font-size="11">{html.escape(fmt_bytes(top))}</text>'
            f'<text x="5" y="{height - 22}" font-size="11">0</text></svg>')


def _table(title: str, rows: list[tuple], header: tuple) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


def html_report(profile: Profile) -> str:
    pe = profile.peak_event or {}
    parts = [f"<h1>memprof: {html.escape(str(profile.meta.get('model_class') or 'run'))} on "
             f"{profile.device}</h1>",
             f"<p>Peak live memory <b>{fmt_bytes(profile.peak)}</b> at step {pe.get('step')}, "
             f"{html.escape(str(pe.get('phase')))}, module {html.escape(str(pe.get('module')))}"
             f", op {html.escape(str(pe.get('op')))}</p>", _svg_timeline(profile)]
    if profile.meta.get("error"):
        parts.insert(1, f"<p class=err>The tracked code raised: "
                        f"{html.escape(profile.meta['error'])}</p>")
    if profile.findings:
        parts.append(_table("Findings", [(f.severity, f.message, f.holder or "",
                                          fmt_bytes(f.bytes), f.fix)
                                         for f in profile.findings],
                            ("severity", "what", "held by", "bytes", "fix")))
    for by in ("category", "module", "op"):
        rows = [(k, fmt_bytes(v)) for k, v in list(profile.breakdown(by).items())[:15]]
        parts.append(_table(f"Alive at the peak, by {by}", rows, (by, "bytes")))
    parts.append(_table("Steps", [(s.index, fmt_bytes(s.peak), fmt_bytes(s.live_at_end))
                                  for s in profile.steps], ("step", "peak", "live at end")))
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1000px}"
             "table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:left}.err{color:#b91c1c}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>memprof report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
