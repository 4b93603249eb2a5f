"""A Profile as one self-contained HTML page (no network; opens from disk).

Findings first; then memory over time as a stacked area by category with steps and phases
shaded and the peak marked; what was alive at the peak (categories, a module icicle, the
largest allocations); one row per step (memory, time split, samples/s, health). Every chart
is SVG drawn here (report/svg.py), so the page reads without JavaScript; a small script of
our own (report/assets/report.js) adds zoom, pan and hover on the timeline from the data
embedded in the page. The timeline keeps every peak however long the run (report/series.py):
a 20M-event profile stays well under 2 MB.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from ..analyse.coverage import model_not_given
from ..analyse.throughput import unmarked_steps
from ..analyse.trainable import parameters_split, shown_parts
from ..finding import sort_findings
from ..profile import Profile
from ..record.events import CATEGORIES
from ..units import fmt_bytes
from .ending import ending, unfinished
from .html_data import (PHASE_CODES, STEP_TIME, module_nodes, shown_steps, step_rows,
                        timeline_data, top_allocations)
from .oom import print_sections as print_oom_sections
from .series import series, step_notes
from .svg import (COLORS, PHASE_COLORS, Frame, bands, esc, fmt_time, icicle, legend, marker,
                  nice_bytes, stacked_bars, stacked_paths)

STATIC_BUCKETS = 450              # static timeline: about 2 points per bucket, 960 px wide
ASSETS = Path(__file__).parent / "assets"
STEP_TIME_COLORS = {"data_ms": "#bab0ab", "forward_ms": PHASE_COLORS["forward"],
                    "eval_ms": "#9ecae9",
                    "backward_ms": PHASE_COLORS["backward"],
                    "optimizer_ms": PHASE_COLORS["optimizer"], "other_ms": "#e8e8e8"}


def asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def table(rows: list[tuple], header: tuple, cls: str = "", raw: bool = False,
          row_attrs: list[str] | None = None) -> str:
    """A table; cells are escaped unless raw (cells that are already HTML); row_attrs: each
    row's attributes (' data-rank="3"'), already HTML."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    cell = (lambda c: str(c)) if raw else esc
    attrs = row_attrs or [""] * len(rows)
    body = "".join(f"<tr{a}>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>"
                   for r, a in zip(rows, attrs))
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def finding_card(f, title: str, facts: list[tuple], attrs: str = "") -> str:
    """One finding as a card: `title` as its heading, `facts` as (name, value) pairs, attrs
    (already HTML) added to the article. `f` has severity, kind, message and fix."""
    dl = "".join(f"<dt>{esc(k)}</dt><dd><code>{esc(v)}</code></dd>" for k, v in facts)
    return (f'<article class="finding {esc(f.severity)}" data-kind="{esc(f.kind)}"{attrs}>'
            f"<h3>{esc(title)}</h3><p>{esc(f.message)}</p>"
            f"<dl>{dl}</dl><p class=fix><b>Fix:</b> {esc(f.fix)}</p></article>")


def page(title: str, body: str, data: dict | None = None, script: bool = False) -> str:
    blob = ""
    if data is not None:
        text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
        blob = f'<script type="application/json" id="memprof-data">{text}</script>'
    js = f"<script>{asset('report.js')}</script>" if script else ""
    return (f"<!doctype html><html lang=en><head><meta charset='utf-8'>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'>"
            f"<title>{esc(title)}</title><style>{asset('report.css')}</style></head>"
            f"<body>{body}{blob}{js}</body></html>")


# ------------------------------------------------------------------ sections
def _header(profile: Profile, has_budget: bool) -> str:
    pe = profile.peak_event or {}
    what = profile.meta.get("model_class") or "run"
    out = [f"<header><h1>memprof: {esc(what)} on {esc(profile.device)}</h1>",
           f'<p class="lead">Peak live memory <b id="peak-bytes" data-bytes="{profile.peak}">'
           f"{esc(fmt_bytes(profile.peak))}</b>"]
    if pe:
        out.append(f" at step {pe['step']}, {esc(pe['phase'])}, module "
                   f"<code>{esc(pe['module'])}</code>, op <code>{esc(pe['op'])}</code>")
    out.append(f". {profile.memory.size:,} memory events, {profile.steps_label} steps.</p>")
    if profile.truncated:
        out.append(f'<p class="err">{esc(profile.truncated)}</p>')
    not_counted = model_not_given(profile)
    if not_counted:
        out.append(f'<p id="not-counted">{esc(not_counted)}</p>')
    if profile.meta.get("error"):
        sentence, crashed = ending(str(profile.meta["error"]))
        out.append(f'<p class="err">{esc(sentence)}</p>' if crashed else f'<p>{esc(sentence)}</p>')
    if isinstance(profile.meta.get("partial"), dict):
        out.append(f'<p class="err">{esc(unfinished(profile.meta["partial"]))}</p>')
    budget = ' <a href="#budget">What would fit</a>' if has_budget else ""
    out.append(f'<nav><a href="#findings">Findings</a>{budget} <a href="#timeline">Memory '
               'over time</a> <a href="#peak">At the peak</a> <a href="#steps">Steps</a> '
               '<a href="#details">Breakdowns</a></nav></header>')
    return "".join(out)


def _findings(profile: Profile) -> str:
    found = sort_findings(profile.findings)
    if not found:
        return '<section id="findings"><h2>Findings</h2><p class="ok">None.</p></section>'
    cards = []
    for f in found:
        growth = (f.evidence or {}).get("slope_bytes_per_step")
        facts = [("bytes", fmt_bytes(f.bytes))] if f.bytes else []   # (time, health: none)
        if f.holder:
            facts.append(("held by", f.holder))
        if growth is not None:
            facts.append(("growth per step", fmt_bytes(growth)))
        facts += step_facts(f.evidence or {})
        cards.append(finding_card(f, f"{f.severity}: {f.kind}", facts))
    return f'<section id="findings"><h2>Findings</h2>{"".join(cards)}</section>'


def step_ranges(steps: list[int]) -> str:
    """Step numbers as ranges: [0, 1, ..., 65] reads "0-65", [0, 1, 2, 5] "0-2, 5" (a card
    listed all 66 numbers)."""
    parts, run = [], []
    for s in sorted(set(steps)):
        if run and s != run[-1] + 1:
            parts.append(_run_text(run))
            run = []
        run.append(s)
    if run:
        parts.append(_run_text(run))
    return ", ".join(parts)


def _run_text(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def step_facts(evidence: dict) -> list[tuple[str, str]]:
    """The steps a finding names, as card facts: a list of steps as ranges (with how many in
    all where the evidence lists only the first ones); a number of steps - what the
    throughput findings measured over - as a count, not as a step ("steps | 5" read as
    step 5)."""
    facts = []
    for key, name in (("steps", "steps"), ("spike_steps", "spike steps")):
        steps = evidence.get(key)
        if isinstance(steps, list) and steps and all(_is_int(s) for s in steps):
            text = step_ranges(steps)
            count = evidence.get("count")
            if _is_int(count) and count > len(steps):
                text += f" (the first {len(steps)} of {count})"
            facts.append((name, text))
    if _is_int(evidence.get("steps")):
        facts.append(("steps measured", str(evidence["steps"])))
    if not facts and _is_int(evidence.get("first_step")):
        facts.append(("first step", str(evidence["first_step"])))
    return facts


TERMINAL_COLUMNS = 120            # the budget section's width, in characters (its tables)


def _budget(profile: Profile) -> str:
    """The budget replay, the out-of-memory diagnosis and what would fit, as the terminal
    report prints them: the same functions (report/oom.py) over the same meta["budget"],
    meta["fit"] and OOM finding, recorded and written as HTML - a finding's fix says "see
    'what would fit'", and the page had no such section."""
    console = Console(record=True, file=io.StringIO(), width=TERMINAL_COLUMNS)
    print_oom_sections(profile, console)
    if not console.export_text(clear=False).strip():
        return ""
    text = console.export_html(inline_styles=True, code_format="{code}")
    return (f'<section id="budget"><h2>Out of memory, budget and what would fit</h2>'
            f'<pre class="code terminal">{text}</pre><p class="hint">As the terminal report '
            f"shows it; the budget replay and what would fit are estimates.</p></section>")


def step_title(data: dict, step: int) -> str:
    """A step's name on the timeline: "step 2", "step 3 (partial)", "step 2 (cut by the
    capacity)" - as the steps table names it."""
    note = data["step_notes"].get(str(step))
    return f"step {step} ({note})" if note else f"step {step}"


def _timeline_svg(profile: Profile, data: dict) -> str:
    s = series(profile, STATIC_BUCKETS)
    t_end = max(data["t_end"], int(s.t_us[-1]) + 1)
    fr = Frame(960, 300, t_end, nice_bytes(profile.peak), bottom=40)
    strip = fr.top + fr.ph + 2
    parts = [bands(fr, [sp for sp in data["steps"] if sp[2] % 2 == 0], fr.top, fr.ph,
                       lambda sp: "#f3f4f6", lambda sp: step_title(data, sp[2]), "step"),
             stacked_paths(fr, s.t_us, s.by_category, CATEGORIES, t_end),
             bands(fr, data["spans"], strip, 8,
                       lambda sp: PHASE_COLORS[data["span_names"][sp[2]]],
                       lambda sp: data["span_names"][sp[2]], "phase"),
             fr.axes(fmt_time)]
    if "t" in data["peak"]:
        parts.append(marker(fr, data["peak"]["t"], f"peak {fmt_bytes(profile.peak)}"))
    return (f'<svg id="timeline-svg" viewBox="0 0 {fr.w} {fr.h}" width="100%" role="img" '
            f'aria-label="live memory by category over time" data-ymax="{fr.y_max}" '
            f'data-tmax="{t_end}" data-left="{fr.left}" data-top="{fr.top}" '
            f'data-pw="{fr.pw}" data-ph="{fr.ph}" xmlns="http://www.w3.org/2000/svg">'
            f'{"".join(parts)}</svg>')


def _timeline(profile: Profile, data: dict) -> str:
    if profile.memory.size == 0:
        return '<section id="timeline"><h2>Memory over time</h2><p>No allocations were ' \
               'recorded.</p></section>'
    items = {c: COLORS[c] for c in CATEGORIES}
    phases = {p: PHASE_COLORS[p] for p in PHASE_CODES}
    note = ("Downsampled for drawing: each time bucket keeps its highest and lowest point, "
            "so every peak is drawn at its true height.")
    return (f'<section id="timeline"><h2>Memory over time</h2>{legend(items)}'
            f'<div class="chart" id="timeline-chart">{_timeline_svg(profile, data)}'
            f'<div id="tooltip" hidden></div></div>{legend(phases, "legend phases")}'
            f'<p class="hint" id="timeline-hint">Steps are shaded; the strip under the chart '
            f'shows phases. {note}</p></section>')


def _at_peak(profile: Profile) -> str:
    cats = profile.breakdown("category")
    total = max(1, sum(cats.values()))
    rows = [(f'<i class="sw" style="background:{COLORS[c]}"></i>{esc(c)}',
             f'<span data-category="{esc(c)}" data-bytes="{b}">{esc(fmt_bytes(b))}</span>',
             f"{100 * b / total:.1f} %") for c, b in cats.items()]
    split = parameters_split(profile)
    parts = shown_parts(split)
    if parts:   # under the parameters row; all trainable: no word
        at = list(cats).index("parameters") + 1
        rows[at:at] = [(f'<span class="sub">{label}</span>',
                        f'<span data-parameters="{part}" data-bytes="{split[part]}">'
                        f'{esc(fmt_bytes(split[part]))}</span>',
                        f"{100 * split[part] / total:.1f} %")
                       for part, label in parts]
    top = [(fmt_bytes(d["size"]), d["category"], d["op"], d["module"], d["node"] or "",
            d["phase"], d["step"]) for d in top_allocations(profile)]
    return (f'<section id="peak"><h2>At the peak</h2>'
            f'<div class="cols"><div><h3>By category</h3>'
            f'{table(rows, ("category", "bytes", "share"), "categories", raw=True)}</div>'
            f'<div class="grow"><h3>Modules</h3>{icicle(module_nodes(profile))}'
            f'<p class="hint">Width is bytes alive at the peak; the stripe under each module '
            f'splits them by category.</p></div></div>'
            f'<h3>Largest allocations alive at the peak</h3>'
            f'{table(top, ("bytes", "category", "op", "module", "autograd node", "phase", "step"))}'
            f"</section>")


def _num(v, fmt="{:.1f}") -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return ", ".join(_num(x, "{:.3g}") for x in v)
    return fmt.format(v)


def step_time_names(data_loader: bool) -> dict[str, str]:
    """One name per part of a step's time, for the table's columns and the bars' legend
    alike (the legend said "data" over a column "before forward"): the time before the
    forward holds the loop's own host work too, and a DataLoader's wait where one was
    iterated (the terminal's table gives that wait a row of its own)."""
    return {"data_ms": "before forward (data, host work)" if data_loader else "before forward",
            "forward_ms": "forward", "eval_ms": "eval", "backward_ms": "backward",
            "optimizer_ms": "optimizer", "other_ms": "other"}


HEALTH_COLUMNS = (("loss", "loss", "{:.4g}"), ("grad_norm_pre_clip",
                                                "grad norm before clipping", "{:.4g}"),
                  ("grad_norm", "grad norm", "{:.4g}"), ("lr", "LR", "{:.3g}"))


def _shown_columns(rows: list[dict]) -> tuple[list, list]:
    """(time parts, health columns) that some step recorded: no "eval" column of zeros for
    a run without an evaluation pass, no "before clip" column where nothing was clipped."""
    parts = [k for k in STEP_TIME if k != "eval_ms" or any(r.get(k) for r in rows)]
    health = [c for c in HEALTH_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    if any(c[0] == "grad_norm_pre_clip" for c in health):   # the norm after clipping
        health = [("grad_norm", "after clipping", c[2]) if c[0] == "grad_norm" else c
                  for c in health]
    return parts, health


def _steps(profile: Profile) -> str:
    all_rows, data_loader = step_rows(profile)
    rows = shown_steps(all_rows)
    if not rows:
        return '<section id="steps"><h2>Steps</h2><p>No step boundaries were recorded ' \
               '(optimizer.step or prof.step()).</p></section>'
    timed = any("wall_ms" in r for r in rows)
    names = step_time_names(data_loader)
    parts, health = _shown_columns(rows)
    header = ["step", "peak", "live at end", "allocated"]
    if timed:
        header += ["wall ms"] + [names[k] for k in parts] + ["samples/s"]
    header += [name for _, name, _ in health]
    body = []
    notes = step_notes(profile)        # a partial last step, one cut by the event capacity
    for r in rows:
        label = notes.get(r["step"], ("",))[0]
        cells = [f"{r['step']} ({label})" if label else r["step"], fmt_bytes(r["peak"]),
                 fmt_bytes(r["live_at_end"]),
                 fmt_bytes(r["allocated"])]
        if timed:
            cells += [_num(r.get(k)) for k in ["wall_ms"] + parts]
            cells.append(_num(r.get("samples_per_s"), "{:.0f}"))
        cells += [_num(r.get(key), fmt) for key, _, fmt in health]
        body.append(tuple(cells))
    bars = ""
    if timed:
        colors = {names[k]: STEP_TIME_COLORS[k] for k in parts}
        bar_rows = [(f"step {r['step']}", {names[k]: r.get(k) or 0 for k in parts})
                    for r in rows if "wall_ms" in r]
        bars = (f"<h3>Time per step</h3>{legend(colors)}"
                + stacked_bars(bar_rows, colors, "ms"))
    note = (f'<p class="hint">{len(rows)} of {len(all_rows)} steps: the first and last 20 '
            f"and the highest peaks.</p>" if len(rows) < len(all_rows) else "")
    unmarked = unmarked_steps(profile)
    if unmarked:
        note += f'<p class="hint">{esc(unmarked)}</p>'
    return (f'<section id="steps"><h2>Steps</h2>{note}{table(body, tuple(header), "steps")}'
            f"{bars}</section>")


def with_rest(rows: list[tuple[str, int]], top: int) -> list[tuple[str, int]]:
    """The first `top` rows and, past them, one "... N more" row with their bytes, so that
    the table adds up (as the terminal's tables do)."""
    if len(rows) <= top:
        return rows
    rest = rows[top:]
    return rows[:top] + [(f"... {len(rest)} more", sum(b for _, b in rest))]


def _details(profile: Profile, top: int = 15) -> str:
    parts = []
    for by in ("module", "op", "node", "phase"):
        rows = [(k, fmt_bytes(v)) for k, v in with_rest(list(profile.breakdown(by).items()), top)]
        parts.append(f"<details><summary>Alive at the peak, by {by}</summary>"
                     f"{table(rows, (by, 'bytes'))}</details>")
    saved = [(k, fmt_bytes(v)) for k, v in with_rest(list(profile.saved_by_node.items()), top)]
    if saved:
        parts.append(f"<details><summary>Saved for backward, by autograd node</summary>"
                     f"{table(saved, ('node', 'bytes'))}</details>")
    return f'<section id="details"><h2>Breakdowns</h2>{"".join(parts)}</section>'


def html_report(profile: Profile) -> str:
    data = timeline_data(profile)
    budget = _budget(profile)
    body = (_header(profile, bool(budget)) + "<main>" + _findings(profile) + budget
            + _timeline(profile, data)
            + _at_peak(profile) + _steps(profile) + _details(profile) + "</main>"
            + f"<footer>memprof report; self-contained, no network. Device "
              f"{esc(profile.device)}; {profile.memory.size:,} memory events.</footer>")
    what = profile.meta.get("model_class") or "run"
    return page(f"memprof: {what}", body, data={"timeline": data}, script=True)
