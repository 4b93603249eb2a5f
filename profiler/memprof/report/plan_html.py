"""A Plan (memprof.recommend) as one self-contained HTML page: predicted reserved memory against
micro-batch for each precision x checkpointing policy, the GPU's usable line, the chosen
option marked; the options, LR / warmup advice and the code that applies the best one.
Static SVG only (hover titles need no script). Every number is an estimate and says so."""
from __future__ import annotations

from ..plan.batch_model import SEARCH_LIMIT
from ..units import fmt_bytes
from .html import page, table
from .plan import nothing_fits, state_line
from .svg import DASHES, LINE_COLORS, Frame, esc, legend, nice_bytes

MAX_POINTS = 48     # micro-batches drawn per line


def micro_batches(plan) -> list[int]:
    """1 .. a little past the largest micro-batch that fits (at least the effective batch);
    thinned geometrically past MAX_POINTS, always keeping the divisors of the batch."""
    fit = [c.max_micro_batch for c in plan.combinations if c.model is not None]
    # the axis stops where the search stopped: past SEARCH_LIMIT nothing was estimated
    top = min(SEARCH_LIMIT, max([plan.effective_batch] + [m + max(1, m // 4) for m in fit]))
    if top <= MAX_POINTS:
        return list(range(1, top + 1))
    picks = {1, top} | {d for d in range(1, plan.effective_batch + 1)
                        if plan.effective_batch % d == 0}
    k = 1.0
    while k < top:
        picks.add(int(k))
        k *= top ** (1 / MAX_POINTS)
    return sorted(m for m in picks if 1 <= m <= top)


def curves(plan) -> list[dict]:
    """Per estimated precision x policy: the predicted option at each drawn micro-batch."""
    xs = micro_batches(plan)
    out = []
    for c in plan.combinations:
        if c.model is None:
            continue
        pts = [plan.predict(m, c.precision, c.checkpointing) for m in xs]
        out.append({"precision": c.precision, "checkpointing": c.checkpointing,
                    "checkpointing_text": c.checkpointing_text, "points": pts})
    return out


def _chart(plan, lines: list[dict]) -> str:
    if not lines:
        return "<p>No precision x checkpointing policy could be estimated.</p>"
    xs = [o.micro_batch for o in lines[0]["points"]]
    # up to where the curves leave the GPU: past 3x the usable line they are cut
    y_top = max([1.25 * plan.usable_bytes] +
                [min(o.peak_reserved, 3 * plan.usable_bytes) for ln in lines
                 for o in ln["points"]])
    fr = Frame(960, 380, max(xs), nice_bytes(y_top), left=80)
    policies = sorted({ln["checkpointing"] for ln in lines})
    out = [fr.axes(lambda v: f"{v:.0f}", x_ticks=_x_ticks(xs))]
    for k, ln in enumerate(lines):
        color = LINE_COLORS[k % len(LINE_COLORS)]
        dash = DASHES[policies.index(ln["checkpointing"]) % len(DASHES)]
        pts = [o for o in ln["points"] if o.peak_reserved <= fr.y_max]
        coords = " ".join(f"{int(fr.x(o.micro_batch))},{int(fr.y(o.peak_reserved))}"
                          for o in pts)
        out.append(f'<g class="curve" data-precision="{esc(ln["precision"])}" '
                   f'data-checkpointing="{esc(ln["checkpointing"])}">'
                   f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                   f'stroke-dasharray="{dash}" points="{coords}"/>')
        for o in pts:
            out.append(f'<circle cx="{int(fr.x(o.micro_batch))}" cy="{int(fr.y(o.peak_reserved))}"'
                       f' r="3" fill="{color}" data-micro-batch="{o.micro_batch}" '
                       f'data-bytes="{o.peak_reserved}"><title>{esc(o.label)}: '
                       f'{esc(fmt_bytes(o.peak_reserved))} reserved (estimate), '
                       f'{"fits" if o.fits else "does not fit"}</title></circle>')
        out.append("</g>")
    out.append(_usable_line(plan, fr))
    if plan.best is not None:
        out.append(_best_mark(plan.best, fr))
    return (f'<svg id="plan-chart" viewBox="0 0 {fr.w} {fr.h}" width="100%" role="img" '
            f'aria-label="predicted memory against micro-batch" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(out)}</svg>'
            f'<p class="hint">x: micro-batch (accumulation = effective batch / micro-batch, '
            f'rounded up); y: predicted reserved memory; circles show each estimate (hover).'
            f'</p>')


def _x_ticks(xs: list[int]) -> list[tuple[int, str]]:
    step = max(1, len(xs) // 12)
    return [(m, str(m)) for m in xs[::step]]


def _usable_line(plan, fr: Frame) -> str:
    y = int(fr.y(plan.usable_bytes))
    return (f'<g class="usable" data-bytes="{plan.usable_bytes}"><line x1="{fr.left}" '
            f'x2="{fr.left + fr.pw}" y1="{y}" y2="{y}" stroke="#b91c1c" stroke-width="2" '
            f'stroke-dasharray="8 4"/><text x="{fr.left + 4}" y="{y - 5}" fill="#b91c1c" '
            f'font-size="12">usable on {esc(plan.gpu.name)}: '
            f'{esc(fmt_bytes(plan.usable_bytes))}</text></g>')


def _best_mark(best, fr: Frame) -> str:
    x, y = int(fr.x(best.micro_batch)), int(fr.y(best.peak_reserved))
    anchor = "end" if x > fr.w * 0.6 else "start"
    dx = -10 if anchor == "end" else 10
    return (f'<g class="best" data-micro-batch="{best.micro_batch}" '
            f'data-precision="{esc(best.precision)}" '
            f'data-checkpointing="{esc(best.checkpointing)}" data-bytes="{best.peak_reserved}">'
            f'<circle cx="{x}" cy="{y}" r="8" fill="none" stroke="#111" stroke-width="2"/>'
            f'<text x="{x + dx}" y="{y - 12}" font-size="12" font-weight="600" '
            f'text-anchor="{anchor}">best: {esc(best.label)}</text></g>')


def _options(plan) -> str:
    best = plan.best
    rows = []
    for o in plan.summary_options():
        cls = "best" if o == best else ("nofit" if not o.fits else "")
        cells = (o.precision, o.checkpointing_text, f"{o.micro_batch} x {o.accumulation}",
                 fmt_bytes(o.peak_reserved), fmt_bytes(o.headroom), "yes" if o.fits else "no",
                 f"{o.samples_per_s:.1f}" if o.samples_per_s else "")
        rows.append(f'<tr class="{cls}">' + "".join(f"<td>{esc(c)}</td>" for c in cells)
                    + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("precision", "checkpointing", "micro-batch x "
                                             "accumulation", "reserved (est.)", "headroom",
                                             "fits", "samples/s (est.)"))
    return f'<table class="options"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}' \
           f"</tbody></table>"


def _advice(plan) -> str:
    out = []
    if plan.lr is not None:
        out.append(table([(k, v) for k, v in vars(plan.lr).items()], ("learning rate", "")))
    if plan.warmup:
        out.append(table(list(plan.warmup.items()), ("warmup", "")))
    skipped = [(f"{c.precision} {c.checkpointing}", c.error or c.skipped)
               for c in plan.combinations if c.model is None]
    if skipped:
        out.append(table(skipped, ("not estimated", "why")))
    return "".join(out)


def plan_html(plan) -> str:
    lines = curves(plan)
    model = plan.model.get("name") if isinstance(plan.model, dict) else plan.model
    best = plan.best
    head = (f"<header><h1>memprof plan: {esc(model)} on {esc(plan.gpu.name)}</h1>"
            f'<p class="lead">Effective batch {plan.effective_batch}; '
            f"{esc(fmt_bytes(plan.gpu.memory_bytes))} on the GPU, "
            f"{esc(fmt_bytes(plan.usable_bytes))} usable. "
            + (f"Best: <b>{esc(best.label)}</b>." + "".join(
                f" {esc(s)}." for s in [state_line(plan, best)] if s) if best else
               "<b>No combination could be estimated.</b>" if plan.failed else
               f"<b>Nothing fits</b>: {esc(nothing_fits(plan))}.")
            + " <b>Every number here is an estimate</b> (fake-tensor steps replayed through a "
              "model of the CUDA caching allocator).</p></header>")
    items = {f"{ln['precision']}, {ln['checkpointing_text']}":
             LINE_COLORS[k % len(LINE_COLORS)] for k, ln in enumerate(lines)}
    body = (head + "<main><section><h2>Predicted memory against micro-batch</h2>"
            + legend(items) + _chart(plan, lines) + "</section>"
            + "<section><h2>Options</h2>" + _options(plan) + _advice(plan) + "</section>"
            + (f'<section><h2>Apply the best option</h2><pre class="code">{esc(plan.code())}'
               f"</pre></section>" if best else "") + "</main>"
            + f"<footer>memprof plan; {plan.estimates} estimates in {plan.wall_s:.1f} s; "
              f"self-contained, no network.</footer>")
    return page(f"memprof plan: {model}", body)
