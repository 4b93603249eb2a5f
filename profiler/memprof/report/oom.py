"""Terminal sections for running out of memory: the diagnosis of an OOM the run hit, the
replay against a GPU budget, and what would fit instead (estimates).

    print_sections(prof, console)    all three, as the full report shows them
    print_diagnosis(prof, console)   the OOM diagnosis and what would fit: what track() prints
                                     to stderr when the block runs out of memory
Reads the `out_of_memory` finding's evidence (memprof.analyse.oom), `meta["budget"]`
(memprof.plan.budget) and `meta["fit"]` (memprof.plan.fit): all plain data, saved with the
profile.
"""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from ..plan.budget import segment_clause
from ..profile import Profile
from ..units import fmt_bytes

TOP = 5


def _where(d: dict) -> str:
    return escape(f"step {d['step']}, {d['phase']}, module {d['module']}, op {d['op']}"
                  + (f", autograd node {d['node']}" if d.get("node") else ""))


def _alive_lines(alive: dict, top: int = TOP) -> list[str]:
    total = alive["bytes"] or 1
    cats = ", ".join(f"{escape(k)} {fmt_bytes(v)} ({100 * v / total:.0f}%)"
                     for k, v in alive["by_category"].items() if v)
    mods = ", ".join(f"{escape(k)} {fmt_bytes(v)}" for k, v in
                     list(alive["by_module"].items())[:top])
    # (an OOM after the event log filled: what the log holds at its end, not at the OOM)
    label = "alive at the log's end" if alive.get("at_log_end") else "alive"
    return [f"[bold]{label}[/] {fmt_bytes(alive['bytes'])}: {cats or 'nothing recorded'}",
            f"[bold]top modules[/] {mods or '-'}"]


def _cause_lines(cause: dict) -> list[str]:
    label = {"growth": "[bold red]a leak[/] (memory grows across steps)",
             "step_too_big": "[bold yellow]a step too big[/]",
             "single_request": "[bold yellow]one request larger than the device[/]",
             "past_the_log": "[bold yellow]not recorded[/] (after the event log filled)"}
    return [f"[bold]cause[/] {label.get(cause['cause'], cause['cause'])}: "
            f"{escape(cause['text'])}"]


def print_diagnosis(prof: Profile, console: Console | None = None) -> None:
    """The first OOM of the run, explained; then what would fit (if estimated)."""
    console = console or Console()
    f = next((f for f in prof.findings if f.kind == "out_of_memory"), None)
    if f is None:
        for oom in prof.oom_events:   # a profile analysed without the OOM analysis
            console.print(f"[bold red]Out of memory[/] on {oom['device']}: tried to allocate "
                          f"{fmt_bytes(oom['requested'])} at {_where(oom)}")
        return
    d = f.evidence
    req = d["request"]
    lines = [f"[bold]tried to allocate[/] {fmt_bytes(req['requested'])} on {req['device']} at "
             f"{_where(req)}",
             f"[bold]memory[/] {escape(d['memory']['text'])}"]
    lines += _alive_lines(d["alive"]) + _cause_lines(d["cause"])
    lines.append(f"[bold]fix[/] {escape(f.fix)}")
    if d.get("ooms", 1) > 1:
        lines.append(f"[dim]{d['ooms']} out-of-memory reports in this run; the first is "
                     "explained[/]")
    console.print(Panel("\n".join(lines), title="[bold red]Out of memory: why[/]",
                        title_align="left"))
    print_fit(prof, console)


def print_budget(prof: Profile, console: Console | None = None) -> None:
    """Whether and where the run would run out on the budget's GPU (replayed: estimate)."""
    b = prof.meta.get("budget")
    if not b:
        return
    console = console or Console()
    total = f" of {fmt_bytes(b['total_memory'])}" if b.get("total_memory") else ""
    head = (f"usable {fmt_bytes(b['capacity'])}{total}; the recorded stream replayed through "
            "the caching-allocator model (estimate)")
    lines = [head]
    fail = b.get("failure")
    if fail:
        lines.append(f"[bold red]does not fit[/]: out of memory at {_where(fail['where'])}, "
                     f"requesting {fmt_bytes(fail['request'])} with "
                     f"{fmt_bytes(fail['reserved'])} reserved "
                     f"({fmt_bytes(fail['allocated'])} allocated, "
                     f"{fmt_bytes(fail['reserved'] - fail['allocated'])} cached but free)"
                     f"{escape(segment_clause(fail, b['capacity']))}")
        lines += _alive_lines(fail["alive"]) + _cause_lines(fail["cause"])
    else:
        at = f" at {_where(b['peak'])}" if b.get("peak") else ""
        # two maxima, maybe of different moments (a run that grows allocates most at its
        # end, after the cache had reserved its peak): said apart, the place is the first's
        lines.append(f"[bold green]fits[/]: peak {fmt_bytes(b['peak_reserved'])} reserved{at} "
                     f"(allocated at most {fmt_bytes(b['peak_allocated'])}); headroom "
                     f"{fmt_bytes(b['headroom'])}")
    prec = b.get("precision")
    if prec and not prec.get("supported", True):   # bf16 on a V100: not as recorded
        lines.append(f"[bold yellow]but[/] {escape(prec['text'])}")
    proj = b.get("projection")
    if proj and proj.get("step") is not None:
        lines.append(
            f"[bold red]but memory grows[/]: step {proj['template_step']} kept "
            f"{fmt_bytes(proj['leak_bytes_per_step'])} alive in {proj['leak_blocks_per_step']} "
            f"block(s); on this GPU the run runs out of memory at [bold]step "
            f"~{proj['step']}[/] ({proj['method']})")
    console.print(Panel("\n".join(lines), title=f"[bold]Budget: {escape(b['budget'])}[/]",
                        title_align="left"))


def print_fit(prof: Profile, console: Console | None = None) -> None:
    """What would fit instead of the step that did not (meta["fit"], estimates)."""
    fit = prof.meta.get("fit")
    if not fit:
        return
    console = console or Console()
    console.print(f"[bold]What would fit[/] {escape(fit['for'])} ({fmt_bytes(fit['capacity'])} "
                  f"usable) instead of step {fit['step']} - [italic]estimates[/]:")
    scaled = fit.get("scaled") or {}
    if scaled.get("text"):
        console.print(f"  {escape(scaled['method'])}: {escape(scaled['text'])}")
    est = fit.get("estimate")
    if est:
        console.print(f"  {escape(est['method'])}: {escape(est['current']['text'])}; what "
                      "fits:")
        t = Table(title_justify="left", box=None, padding=(0, 2))
        for col in ("precision", "checkpointing", "micro-batch x accumulation",
                    "reserved (estimate)", "headroom"):
            t.add_column(col, justify="left" if col in ("precision", "checkpointing") else
                         "right")
        for o in est["options"]:
            if o.get("fits"):
                t.add_row(o["precision"], o["checkpointing"],
                          f"{o['micro_batch']} x {o['accumulation']}",
                          fmt_bytes(o["peak_reserved"]), fmt_bytes(o["headroom"]))
            else:
                t.add_row(o["precision"], o["checkpointing"], "-", escape(o["text"]), "")
        console.print(t)
        for note in est.get("notes", []):   # precision: not on this GPU, fp16 overflow
            console.print(f"  [yellow]note[/]: {escape(note)}")
        console.print("  [dim]assumptions: " + escape("; ".join(est["assumptions"])) + "[/]")
    if fit.get("note"):
        console.print(f"  [dim]{escape(fit['note'])}[/]")


def print_sections(prof: Profile, console: Console | None = None) -> None:
    """Everything about running out of memory that the profile holds."""
    console = console or Console()
    print_diagnosis(prof, console)
    print_budget(prof, console)
    if not any(f.kind == "out_of_memory" for f in prof.findings):
        print_fit(prof, console)   # the diagnosis prints it otherwise
