"""The rich terminal report: findings first, then the peak and what was alive at it."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from ..analyse import health as health_analysis
from ..analyse import throughput as throughput_analysis
from ..analyse.coverage import model_not_given
from ..analyse.trainable import parameters_split, shown_parts
from ..profile import Profile
from ..record.events import CATEGORIES
from ..stats import describe
from ..units import fmt_bytes
from .ending import ending, unfinished
from .oom import print_sections as print_oom_sections

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _side_drops(meta: dict) -> str:
    """Markers and sequence records past their cap: what the report no longer knows."""
    m, q = meta.get("markers_dropped", 0), meta.get("seq_records_dropped", 0)
    if not (m or q):
        return ""
    return (f"\n[yellow]past the capacity, {m:,} markers (steps, phases) and {q:,} autograd "
            "records were not kept: steps, phases and backward attribution after that point "
            "are missing[/]")


def _share(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole else "   -  "


def print_report(prof: Profile, console: Console | None = None, top: int = 8) -> None:
    console = console or Console()
    s_peak = prof.peak
    title = escape(f"memprof: {prof.meta.get('model_class') or 'tracked code'} on {prof.device}"
                   + (f", rank {prof.meta['rank']} of {prof.meta.get('world_size')}"
                      if prof.meta.get("rank") is not None else ""))
    if prof.meta.get("error"):
        sentence, crashed = ending(str(prof.meta["error"]))
        console.print(f"[bold{' red' if crashed else ''}]{escape(sentence)}[/]")
    if isinstance(prof.meta.get("partial"), dict):
        console.print(f"[bold red]{escape(unfinished(prof.meta['partial']))}[/]")
    print_oom_sections(prof, console)   # OOM diagnosis, budget, what would fit (report/oom.py)
    if prof.findings:
        t = Table(title="Findings", title_justify="left", show_lines=True, expand=True)
        t.add_column("severity", no_wrap=True)
        t.add_column("what", ratio=3, overflow="fold")
        t.add_column("bytes", justify="right", no_wrap=True)
        t.add_column("fix", ratio=2, overflow="fold")
        for f in prof.findings:
            what = ((f"[bold]held by {escape(f.holder)}[/]\n" if f.holder else "")
                    + escape(f.message))
            t.add_row(f"[{SEVERITY_STYLE.get(f.severity, '')}]{escape(f.severity)}[/]", what,
                      fmt_bytes(f.bytes) if f.bytes else "-",   # (time, health: no bytes)
                      escape(f.fix))
        console.print(t)
    not_counted = model_not_given(prof)
    pe = prof.peak_event
    where = "-"
    if pe:
        node = f", autograd node {pe['node']}" if pe['node'] else ""
        where = (f"step {pe['step']}, {pe['phase']}, module [bold]{escape(pe['module'])}[/], "
                 + escape(f"op {pe['op']}{node}"))
    console.print(Panel.fit(
        f"[bold]peak live memory[/] {fmt_bytes(s_peak)}   at {where}\n"
        f"events {prof.memory.size:,}   steps {prof.steps_label}   "
        f"dropped events {prof.meta.get('dropped', 0)}" + _side_drops(prof.meta)
        + (f"\n[bold red]{escape(prof.truncated)}[/]" if prof.truncated else "")
        + ("\n[cyan]torch.compile: memory inside compiled code is attributed to the compiled "
           "module as a whole (per-module attribution is coarser)[/]"
           if prof.meta.get("compiled") else "")
        + (f"\n[cyan]{escape(not_counted)}[/]" if not_counted else ""), title=title))
    if not prof.memory.size and not s_peak:   # eight zero rows and two empty tables said less
        console.print("Nothing was allocated inside the block: its code ended before it "
                      "allocated, trained before or after it, or ran on a device whose "
                      "allocator memprof does not hook.")
        return

    cat = prof.breakdown("category")
    t = Table(title="Alive at the peak, by category", title_justify="left")
    t.add_column("category")
    t.add_column("bytes", justify="right")
    t.add_column("share", justify="right")
    split = parameters_split(prof)
    for name in CATEGORIES:
        t.add_row(name, fmt_bytes(cat.get(name, 0)), _share(cat.get(name, 0), s_peak))
        if name == "parameters":   # all trainable: no word
            for part, label in shown_parts(split):
                t.add_row(f"  {label}", fmt_bytes(split[part]), _share(split[part], s_peak),
                          style="dim")
    console.print(t)

    shown = [("module", "module (self)"), ("op", "op that allocated")]
    threads = [t for t in prof.breakdown("thread") if t != "before tracking"]
    if len(threads) > 1:   # another thread than the model's holds memory at the peak
        shown.append(("thread", "thread that allocated"))
    for by, label in shown:
        rows = list(prof.breakdown(by).items())
        t = Table(title=f"Alive at the peak, by {label}", title_justify="left")
        t.add_column(by, overflow="fold")   # whole: a cut `...q_proj.lora...` hid A from B
        t.add_column("bytes", justify="right")
        t.add_column("share", justify="right")
        for name, b in rows[:top]:
            t.add_row(escape(name), fmt_bytes(b), _share(b, s_peak))
        rest = _rest_row(rows, top)
        if rest:
            t.add_row(rest[0], fmt_bytes(rest[1]), _share(rest[1], s_peak), style="dim")
        console.print(t)

    saved = list(prof.saved_by_node.items())
    if saved:
        t = Table(title="Saved for backward, released by autograd node (per run)",
                  title_justify="left")
        t.add_column("autograd node", overflow="fold")
        t.add_column("bytes", justify="right")
        for name, b in saved[:top]:
            t.add_row(escape(name), fmt_bytes(b))
        rest = _rest_row(saved, top)
        if rest:
            t.add_row(rest[0], fmt_bytes(rest[1]), style="dim")
        console.print(t)

    _print_steps(prof, console, top)
    _print_throughput(prof, console)  # throughput / training health (memprof.throughput,
    _print_health(prof, console)      # memprof.health)
    errors = prof.meta.get("analysis_errors")
    if errors:
        console.print("[yellow]Some checks could not run:[/] " + escape("; ".join(errors)))


def _rest_row(rows: list, top: int) -> tuple[str, int] | None:
    """The rows past the first `top`, as one ("... N more", their bytes): a table that showed
    the top 8 modules alone did not add up to the peak, and did not say so."""
    if len(rows) <= top:
        return None
    rest = rows[top:]
    return f"... {len(rest)} more", sum(b for _, b in rest)


def _print_steps(prof: Profile, console: Console, top: int) -> None:
    steps = prof.steps
    if not steps:
        return
    partial = prof.partial_last_step
    t = Table(title="Steps", title_justify="left", caption_justify="left",
              caption="partial: work after the last step boundary (an evaluation pass, a loop "
                      "cut short), not a finished step" if partial else None)
    for col in ("step", "peak", "live at end", "allocated"):
        t.add_column(col, justify="right")
    elided = len(steps) - 2 * top
    for s in (steps if elided <= 0 else steps[:top]):
        _step_row(t, s, partial and s is steps[-1])
    if elided > 0:
        t.add_row(f"[dim]... {elided} steps not shown ...[/]", "", "", "")
        for s in steps[-top:]:
            _step_row(t, s, partial and s is steps[-1])
    console.print(t)


def _step_row(t: Table, s, partial: bool) -> None:
    t.add_row(f"{s.index} (partial)" if partial else str(s.index), fmt_bytes(s.peak),
              fmt_bytes(s.live_at_end), fmt_bytes(s.allocated))


# ------------------------------------------------------------------ throughput / training health
def _g(x, fmt="{:.4g}") -> str:
    return "-" if x is None else fmt.format(x)


def _per(tp: dict) -> str:
    """What the spread of samples/s is over: steps, or rounds of the steps of optimizers
    that take turns (analyse.turns)."""
    return tp.get("samples_per_s_per") or "step"


def _batch(tp: dict) -> str:
    """The micro-batch size; where sizes varied, their range beside the median."""
    low_high = tp.get("batch_size_range")
    if low_high and low_high[0] != low_high[1]:
        return f"{_g(tp.get('batch_size'))} (median; sizes {low_high[0]}-{low_high[1]})"
    return _g(tp.get("batch_size"))


def _print_throughput(prof: Profile, console: Console) -> None:
    tp = throughput_analysis.summarize(prof)
    if not tp or not tp.get("steps"):
        hint = throughput_analysis.unmarked_steps(prof)
        if hint:
            console.print(escape(f"Steps: {hint}"))
        return
    st = tp["stats"]
    clock = "CUDA events" if tp["clock"] == "cuda_events" else "host clock"
    step = _step_word(prof)
    excluded = (f"{tp['warmup_steps_excluded']} warm-up step(s)"
                + (f" and {tp['compile_steps_excluded']} compiling" if
                   tp.get("compile_steps_excluded") else "") + " excluded")
    if tp.get("warmup_measured"):
        excluded = "warm-up only: first-step costs (lazy init, first allocations) included"
    t = Table(title=f"Throughput per {step}: median over {tp['steps_measured']} "
                    f"step{'s' if tp['steps_measured'] != 1 else ''}, {excluded} ({clock})",
              title_justify="left")
    for col in ("phase", "median ms", "p10 ms", "p90 ms", "share"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    wall = (st.get("wall_ms") or {}).get("median")
    evaluated = any(tp["per_step"].get("eval_ms") or ())
    _stat_rows(t, st, wall, (("data_ms", _data_row(tp)),)
               + ((("loader_ms", "  of it: waiting for the DataLoader"),)
                  if tp.get("data_loader_seen") else ()) + (("forward_ms", "forward"),)
               + ((("eval_ms", "evaluation (passes without gradients)"),) if evaluated else ())
               + (("backward_ms", "backward"), ("optimizer_ms", "optimizer"),
                  ("other_ms", "other"), ("wall_ms", "step")))
    _add_communication_rows(t, st, wall, _data_row(tp))
    console.print(t)
    _print_collectives(tp, console)
    sps = st.get("samples_per_s")
    with_micro, measured = tp.get("steps_with_micro_steps"), tp.get("steps_measured")
    some = (f" (in the {with_micro} of {measured} steps that ran the model)"
            if with_micro and measured and with_micro < measured else "")
    spread = tp.get("micro_steps_range") or [None, None]
    if spread[0] is not None and spread[0] != spread[1]:
        some += f" ({spread[0]}-{spread[1]} by step)"
    world = prof.meta.get("world_size")
    # (the job's is the sum over its ranks: x world only where each rank's batch is this one's)
    rank = (f" of rank {prof.meta['rank']} (the job's: the sum over its {world} ranks, about "
            f"{world} x this for ranks alike in batch and speed; merge the ranks' files)"
            if prof.meta.get("rank") is not None and world and world > 1 else "")
    line = (f"micro-steps per {step.split(' (')[0]} {_g(tp.get('micro_steps_per_step'))}{some}"
            f"{' (gradient accumulation)' if tp.get('gradient_accumulation') else ''}   "
            f"batch {_batch(tp)}   samples/s "
            + (f"{tp['samples_per_s_overall']:.1f}{rank} over the measured steps (per "
               f"{_per(tp)} median {sps['median']:.1f}, p10 {sps['p10']:.1f}, p90 "
               f"{sps['p90']:.1f})" if sps and tp.get("samples_per_s_overall")
               else "- (batch size unknown: track(batch_size=N) or memprof run --batch-size N)"))
    gpu = tp.get("gpu")
    if gpu:
        u = gpu.get("utilization_pct")
        line += ("\nGPU utilisation " + (f"{u['median']:.0f}% median (p10 {u['p10']:.0f}%, "
                                          f"p90 {u['p90']:.0f}%), memory used max "
                                          f"{fmt_bytes(gpu.get('memory_used_bytes_max', 0))}"
                                          if u else escape(f"not sampled ({gpu.get('error')})")))
    console.print(line)


def _step_word(prof: Profile) -> str:
    """What a step is: an optimizer step, or what the run was told ends one (--step-on
    Trainer.training_step read "per optimizer step" for each micro-batch)."""
    how = prof.meta.get("step_on", "auto")
    return {"manual": "marked step (prof.step() or --step-on FUNCTION)",
            "backward": "step (one per backward())"}.get(how, "optimizer step")


def _data_row(tp: dict) -> str:
    """The name of the time before a step's first forward: the loop's own host work (logging,
    a batch made by hand) and, where a DataLoader was iterated, its wait - the row below it.
    Not "data wait" for the whole: a run that logged and slept after its step read 47 ms of
    "data wait" where its DataLoader finding said 36."""
    return ("before forward (data, host work)" if tp.get("data_loader_seen")
            else "before forward (no DataLoader)")


def _add_communication_rows(t: Table, st: dict, wall, data_row: str) -> None:
    """A distributed run's step split again: compute, communication (collectives in flight,
    overlapping the phases above) and data wait (analyse.communication)."""
    if not st.get("comm_ms"):
        return
    t.add_section()
    overlap = (st.get("comm_in_data_ms") or {}).get("p90")   # (a Trainer's all_gather)
    _stat_rows(t, st, wall, (("compute_ms", "compute (step - data ∪ comm)"),
                             ("comm_ms", "communication (in flight)"))
               + ((("comm_in_data_ms", "  of it: during the time before forward"),)
                  if overlap else ()) + (("data_ms", data_row),))


def _stat_rows(t: Table, st: dict, wall, rows) -> None:
    """One row per (stats key, name) present: median, p10, p90 and share: of the measured
    steps' time where the summary has it (the phases), else of the median step."""
    for key, name in rows:
        s = st.get(key)
        if s:
            part = s.get("share", s["median"] / wall if wall else None)
            share = f"{100 * part:5.1f}%" if part is not None else "-"
            t.add_row(name, f"{s['median']:.2f}", f"{s['p10']:.2f}", f"{s['p90']:.2f}", share)


def _print_collectives(tp: dict, console: Console) -> None:
    comm = tp.get("communication")
    if not comm:
        return
    parts = [f"{op} {row['calls']}x {fmt_bytes(row['bytes'] // max(row['calls'], 1))} "
             f"{row['ms']:.1f} ms" for op, row in comm["by_op"].items()]
    console.print(escape("collectives (launch to completion, all steps): " + ", ".join(parts)
                         + (f"; {comm['incomplete_calls']} not completed in the block"
                            if comm["incomplete_calls"] else "")))


def _range_test_text(rt: dict) -> str:
    """The health table's LR cell for an LR range test (analyse.lr_range): the sweep and what
    it found, where a warmup's length would be."""
    out = (f"x{rt['factor_per_step']:.4g} a step for all {rt['steps']} optimizer steps: an LR "
           "range test, not a warmup")
    low, div = rt.get("lowest_loss"), rt.get("diverged")
    if low:
        out += f"; lowest loss {_g(low['loss'])} at LR {_g(low['lr'])} (step {low['step']})"
    if div:
        out += f", diverged from LR {_g(div['lr'])} (step {div['step']})"
    return out


def _print_health(prof: Profile, console: Console) -> None:
    h = health_analysis.summarize(prof)
    if not h:
        return
    ps = h.get("per_step", {})
    # a Trainer logging every 2nd step logs half of them; work after the last step (an
    # evaluation, an EMA update) is no optimizer step
    ran = len(prof.steps) - bool(prof.partial_last_step)
    seen = (f"{h['steps']} optimizer steps" if h["steps"] >= ran else
            f"{h['steps']} of {ran} optimizer steps logged")
    t = Table(title=f"Training health ({seen})", title_justify="left")
    t.add_column("what")
    t.add_column("value")

    def series(vals):
        # the statistics every layer uses, as for the norms before clipping: two rules read
        # 5.305 against 4.578 for the same, unclipped norms
        d = describe(vals)
        return None if d is None else (d["median"], d["p90"], d["max"])

    loss = h.get("loss") or {}
    if loss.get("first") is not None:
        t.add_row("loss", f"first {_g(loss['first'])}, last {_g(loss['last'])}, median "
                          f"{_g(loss.get('median'))}; {len(loss.get('spikes', []))} spike(s) "
                          + escape(f"(from {h.get('loss_source')})"))
    skipped = h.get("skipped_by_grad_scaler") or []
    if skipped:
        shown = ", ".join(map(str, skipped[:8])) + (", ..." if len(skipped) > 8 else "")
        t.add_row("skipped by GradScaler", f"{len(skipped)} step(s) (inf/NaN gradients, no "
                  f"update): {shown}")
    gn = series(ps.get("grad_norm", []))
    if gn:
        t.add_row("grad norm seen by the optimizer",
                  f"median {gn[0]:.4g}, p90 {gn[1]:.4g}, max {gn[2]:.4g}")
    clip = h.get("clipping")
    if clip and clip.get("pre_clip_norm"):
        pc = clip["pre_clip_norm"]
        t.add_row("grad norm before clipping",
                  f"median {pc['median']:.4g}, p90 {pc['p90']:.4g}, max {pc['max']:.4g}; "
                  f"max_norm {clip['max_norm']:.4g}: clipped {clip['steps_clipped']} of "
                  f"{clip['steps_with_clip']} steps")
    vc = h.get("value_clipping")
    if vc:
        limits = ", ".join(map(_g, vc["clip_values"]))
        t.add_row("clip_grad_value_", f"gradients clamped entry by entry to +-{limits} in "
                  f"{vc['steps']} of {h.get('steps', '-')} steps")
    lr = h.get("lr") or {}
    if lr.get("first") is not None:
        warm = lr.get("warmup_optimizer_steps")
        more = "" if lr.get("warmup_complete") or not warm else "+"
        micro = h.get("micro_steps_per_optimizer_step")
        # with accumulation, the same warmup in micro-steps too: a warmup sized in batches
        # but stepped per optimizer step shows as k times the steps the recipe meant
        in_micro = ""
        if warm and micro and micro > 1:
            counted = lr.get("warmup_micro_steps")
            in_micro = (f" = {counted}{more} micro-steps" if counted is not None
                        else f" = {warm * micro:g}{more} micro-steps")
            if counted is None or counted == warm * micro:
                in_micro += f" at {micro:g} per optimizer step"
        t.add_row("learning rate (group 0)",
                  f"first {_g(lr['first'])}, peak {_g(lr['peak'])}, last {_g(lr['last'])}; "
                  + (_range_test_text(lr["range_test"]) if lr.get("range_test") else
                     f"warmup {_g(warm, '{}')}{more} optimizer steps{in_micro}"))
    for sc in h.get("schedulers", []):
        t.add_row(escape(f"scheduler {sc['class']}"),
                  f"{sc['calls']} steps for {sc['optimizer_steps']} optimizer steps; "
                  f"{sc['before_optimizer_calls']} before optimizer.step()")
    nf = h.get("nonfinite") or {}
    parts = []
    for what in ("loss", "gradient"):
        steps = nf.get(f"{what}_steps") or []
        if steps:
            more = f" and {len(steps) - 5} more" if len(steps) > 5 else ""
            parts.append(f"{what} at steps {', '.join(map(str, steps[:5]))}{more}")
    if parts and nf.get("first_parameter"):
        parts.append(f"first parameter {nf['first_parameter']}")
    if parts:
        t.add_row("non-finite", escape("; ".join(parts)))
    console.print(t)
