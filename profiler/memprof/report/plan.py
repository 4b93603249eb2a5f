"""The terminal report of a plan (`memprof.recommend`): rich table, advice, code for the best."""
from __future__ import annotations

import contextlib

from rich.markup import escape

from ..plan.batch_model import SEARCH_LIMIT
from ..units import fmt_bytes
from .plan_distributed import batch_text, print_distributed

GiB = 1 << 30

__all__ = ["print_plan", "search_progress"]


@contextlib.contextmanager
def search_progress(console):
    """A progress bar on `console` while a plan is searched: yields the callback
    progress(done, total, label) that `memprof.recommend(progress=)` takes, or None when the
    console is not a terminal."""
    if not console.is_terminal:
        yield None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn)
    with Progress(SpinnerColumn(), TextColumn("estimating {task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("", total=None)

        def progress(done, total, label):
            bar.update(task, completed=done, total=total, description=label)
        yield progress


def _options_table(plan, all_options: bool):
    """The options as a rich table (user-derived text escaped: it may hold [brackets])."""
    from rich import box
    from rich.table import Table
    g = plan.gpu
    title = (f"What fits: {escape(str(plan.model['name']))} on {g.name} ({g.memory_bytes / GiB:.2f} GiB, "
             f"usable {plan.usable_bytes / GiB:.2f} GiB), {batch_text(plan)} - ESTIMATES, "
             "memory in GiB")
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
              collapse_padding=True)
    for col in ("#", "prec", "checkpoint", "micro x acc", "alloc", "reserved",
                "headroom", "fits", "samples/s*"):
        t.add_column(col, justify="left" if col in ("prec", "checkpoint", "fits")
                     else "right", no_wrap=True)
    rows = plan.options if all_options else plan.summary_options()
    for i, o in enumerate(rows, 1):
        style = None if o.fits else "dim"
        t.add_row(str(i) if o.fits else "-", o.precision, o.checkpointing_text,
                  f"{o.micro_batch} x {o.accumulation}", f"{o.peak_allocated / GiB:.2f}",
                  f"{o.peak_reserved / GiB:.2f}", f"{o.headroom / GiB:+.2f}",
                  "[green]yes[/]" if o.fits else "[red]no[/]",
                  "-" if o.samples_per_s is None else f"{o.samples_per_s:.1f}",
                  style=style)
    return t


def _max_batch_text(plan, c) -> str:
    """A combination's largest micro-batch; a search that stopped at its limit is not a
    result ('the whole effective batch' or 'more than' the limit)."""
    if c.model is None:
        return str(c.skipped or c.error)
    if c.max_micro_batch < SEARCH_LIMIT:
        return str(c.max_micro_batch)
    if plan.effective_batch <= SEARCH_LIMIT:
        return f"the whole effective batch {plan.effective_batch} in one micro-batch"
    return f"more than {SEARCH_LIMIT - 1} (the search stops there)"


def _print_basis(plan, console) -> None:
    """Largest micro-batch per precision x policy, and what the numbers assume."""
    said: dict[str, list[str]] = {}   # one line per distinct result, naming its combinations
    for c in plan.combinations:
        said.setdefault(_max_batch_text(plan, c), []).append(
            f"{c.precision}/{c.checkpointing_text}")
    console.print("max micro-batch (with gradient accumulation): " + "; ".join(
        f"{', '.join(names)}: {escape(text)}" for text, names in said.items()))
    a = plan.assumptions
    utilisation = ", ".join(f"{k} {v:.0%}" for k, v in a["utilisation"].items()
                            if k in plan.precisions)
    console.print(
        f"[dim]Estimates: fake-tensor training steps ({plan.estimates} run, "
        f"{plan.wall_s:.1f} s), steady state; fits = reserved <= usable = total - "
        f"{a['overhead_bytes'] / 2**20:.0f} MiB CUDA context - {a['margin']:.0%} margin; "
        f"samples/s assume {utilisation} "
        f"of peak FLOP/s and {a['bandwidth_utilisation']:.0%} of bandwidth "
        "(* assumptions, not measurements).[/]")


def nothing_fits(plan) -> str:
    """Why nothing fits, and what can help. At micro-batch 1 a smaller effective batch cannot
    help (accumulation already makes it up): the model's own memory is too large."""
    smallest = min((o for o in plan.options if o.estimated), key=lambda o: o.peak_reserved,
                   default=None)
    if smallest is None or smallest.micro_batch > 1:
        return "lower the effective batch per GPU or use a GPU with more memory"
    head = (f"even micro-batch 1 needs {smallest.peak_reserved / GiB:.2f} GiB reserved at best "
            f"({smallest.precision}, checkpointing {smallest.checkpointing_text}) against "
            f"{plan.usable_bytes / GiB:.2f} GiB usable: a smaller batch cannot help. ")
    frozen = plan.total_params - plan.trainable_params
    if plan.total_params and frozen > plan.trainable_params:
        # a LoRA model: the frozen base is the size, not what trains (a lower rank saves
        # nothing worth saying)
        frozen_bytes = plan.params_bytes * frozen / plan.total_params
        smaller = ("keep them in bf16 or fp16 (load the base model in half precision; the "
                   "trained adapters can stay fp32)" if frozen_bytes >= 3 * frozen else
                   "quantise them (8- or 4-bit base weights, as QLoRA does)")
        return (head + f"{frozen:,} of the {plan.total_params:,} parameters do not train and "
                f"take ~{fmt_bytes(frozen_bytes)} as given: {smaller}, shard them over "
                "several GPUs (FSDP), or use a GPU with more memory")
    return (head + "The parameters, their gradients and the optimizer state are too large "
            "for this GPU: train fewer parameters (a lower LoRA rank or fewer target modules, "
            "frozen layers), shard them over several GPUs (FSDP, ZeRO), or use a GPU with "
            "more memory")


def state_line(plan, best) -> str | None:
    """What the best option's step holds at any micro-batch: parameters (how many train: a
    LoRA model's frozen base is its size), gradients, optimizer state. One rank of N GPUs
    holds shards of them: not said there."""
    c = plan._combos.get((best.precision, best.checkpointing))
    if c is None or c.model is None or plan.distributed is not None:
        return None
    trains = (f"all {plan.total_params:,} train" if plan.trainable_params == plan.total_params
              else f"{plan.trainable_params:,} of {plan.total_params:,} parameters train")
    return (f"model state (any micro-batch): parameters {fmt_bytes(c.params_bytes)} "
            f"({trains}), gradients "
            f"{fmt_bytes(c.gradient_bytes)}, optimizer state {fmt_bytes(c.state_bytes)} "
            f"({plan.optimizer}); activations and temporaries grow with the "
            "micro-batch")


def _print_advice(plan, console) -> None:
    """The best option with its code, then LR and warmup advice."""
    from rich.syntax import Syntax
    best = plan.best
    if best is None and plan.failed:
        console.print("[red]No combination could be estimated[/]: every estimate failed "
                      "(the errors are above); nothing was learnt about what fits.")
    elif best is None:
        failed = sum(c.error is not None for c in plan.combinations)
        console.print("[red]Nothing fits[/]" + (f" among the combinations estimated ({failed} "
                                                f"could not be, see above)" if failed else "")
                      + f": {nothing_fits(plan)}.")
        for note in plan.notes():
            console.print(f"  [yellow]note[/]: {escape(note)}")
    else:
        console.print(f"[bold]Best (estimated)[/]: {best.label}: "
                      f"{best.peak_reserved / GiB:.2f} GiB reserved"
                      + ("" if best.samples_per_s is None else
                         f", ~{best.samples_per_s:.1f} samples/s"))
        state = state_line(plan, best)
        if state:
            console.print(f"  {escape(state)}")
        for note in plan.notes(best):   # converted weights, no loss scaling, fp16 overflow
            console.print(f"  [yellow]note[/]: {escape(note)}")
        near = plan.nearby_batch(best)
        if near is not None:
            e, micro = near
            console.print(f"  (micro-batch {best.micro_batch} is the largest divisor of "
                          f"{plan.effective_batch} that fits; effective batch {e} would run "
                          f"micro-batch {micro} x {e // micro})")
        # whole lines (a console wraps at its width, a pipe at 80 columns): code to copy
        console.print(Syntax(plan.code(), "python", theme="ansi_dark", word_wrap=False),
                      soft_wrap=True)
    if plan.lr is not None:
        for line in plan.lr.lines():
            console.print(("[yellow]" + line + "[/]") if "WARNING" in line else line)
    w = plan.warmup
    if w is not None:
        console.print(f"warmup: {w['formula']}")
        console.print(f"  {w['note']}")


def print_plan(plan, console=None, all_options: bool = False) -> None:
    """Rich table of the plan's options (a summary, or all of them) plus LR / warmup advice and
    the code for the best option."""
    from rich.console import Console
    console = console or Console()
    if plan.assumptions.get("gpu"):   # how an ambiguous name was read ('a100': the 40 GB one)
        console.print(f"[yellow]{escape(plan.assumptions['gpu'])}[/]")
    console.print(_options_table(plan, all_options))
    _print_basis(plan, console)
    print_distributed(plan, console)
    _print_advice(plan, console)
