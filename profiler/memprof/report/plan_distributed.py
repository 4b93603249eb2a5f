"""What a plan for N GPUs adds to the terminal report (memprof.plan.distributed)."""
from __future__ import annotations

from rich.markup import escape

GiB = 1 << 30

__all__ = ["batch_text", "print_distributed"]


def batch_text(plan) -> str:
    """'effective batch 32' or, for N GPUs, 'batch 32 per GPU x 8 GPUs (zero3) = 256'."""
    if getattr(plan, "distributed", None) is None:
        return f"effective batch {plan.effective_batch}"
    d = plan.distributed
    return (f"batch {plan.effective_batch} per GPU x {d.world_size} GPUs "
            f"({d.strategy.name}{f', {d.nodes} nodes' if d.nodes > 1 else ''}) = global batch "
            f"{plan.global_batch}")


def print_distributed(plan, console) -> None:
    """The strategy, the rules applied, and the best option's communication (a model)."""
    a = plan.assumptions.get("distributed") if getattr(plan, "distributed", None) else None
    if a is None:
        return
    console.print(f"[bold]Per rank[/] of {a['world_size']} GPUs, {escape(a['strategy'])}: "
                  f"{escape(a['what'])}. Memory columns are one GPU's; samples/s the job's.")
    if "layout" in a:
        console.print(f"layout {escape(a['layout'])}: {escape(a['layout_means'])} "
                      "(--layout torch | zero-paper)")
        if a["layout"] == "zero-paper":   # "fits" here, "nothing fits" for the code printed
            console.print("[yellow]the code below is PyTorch's, which allocates as --layout "
                          "torch estimates (the default): this layout's figures hold for a "
                          "framework that keeps DeepSpeed's layout, not for that code[/]")
    for rule in a["rules_applied"]:
        console.print(f"[dim]  rule {escape(rule)}[/]")
    console.print(f"apply it under torchrun: {escape(a['how'])}")
    best = plan.best
    if best is None:
        return
    comm = best.communication
    if comm is None:
        console.print("communication: not modelled (the GPU's interconnect is not in the "
                      "table, or one rank)")
        return
    parts = [f"{c['name']} {c['tensor_bytes'] / GiB:.2f} GiB ({c['seconds'] * 1e3:.1f} ms, "
             f"per {c['per']}, overlaps {c['overlaps']})" for c in comm["collectives"]]
    console.print(f"communication per optimizer step of the best option (a MODEL over "
                  f"{escape(comm['link'])} x utilisation): " + "; ".join(parts) + "; exposed "
                  f"{comm['exposed_s'] * 1e3:.1f} ms of {comm['total_s'] * 1e3:.1f} ms")
