"""`memprof demo`: the story of seeds/000 end to end, on a small DCAL model, every number measured.

1. The bug: attention maps kept without .detach() (and kept for later visualisation) -> memprof
   names the retained graph, who holds it, and the growth per step.
2. The fix (.detach(), keep only the current maps) -> no findings, flat memory.
3. The memory-critical core: the same training step with the fused attention kernels next to
   the math baseline that materialises every N x N map.
4. What fits: `recommend` for dcal-vit-b16 on a 16 GB V100, estimated without that GPU.
5. Killed outright (seed 004: "KILLED by OOM (exit code 137)"): a leaking loop under
   `memprof run` is SIGKILLed as the kernel's OOM killer would; the profile saved while it ran
   says so and names the holder.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import torch
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

import memprof
from memprof.models import build_model
from memprof.units import fmt_bytes

# A DCAL small enough for 2 CPU cores, big enough that attention maps matter (65 tokens).
DEMO_MODEL = dict(img_size=64, patch_size=8, dim=128, depth=4, heads=4, num_classes=20)
BATCH = 8
# For the kernels: DCAL's sequence length at 448 px with 16-px patches (785 tokens), with a
# narrow, shallow backbone so that two CPU cores run it in seconds.
KERNEL_MODEL = dict(img_size=224, patch_size=8, dim=128, depth=2, heads=4, num_classes=20)
KERNEL_BATCH = 2
GiB = 1 << 30
V100 = "v100-16gb"


def _train(console, steps: int, *, detach_history: bool, keep_maps: bool,
           attention_backend: str = "math", report: bool = True, config=None, batch=BATCH,
           budget=None):
    torch.manual_seed(0)
    model, make_batch, loss_fn = build_model("dcal-vit-tiny", detach_history=detach_history,
                                             attention_backend=attention_backend,
                                             **(config or DEMO_MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [make_batch(batch) for _ in range(steps)]
    attention_maps_for_plots = []   # what a user keeps to visualise attention later
    t0 = time.perf_counter()
    with memprof.track(model, opt, budget=budget) as prof:
        for inputs, targets in batches:
            loss = loss_fn(model(*inputs), targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if keep_maps:
                attention_maps_for_plots.append(model.sa_attention_history)
            else:
                attention_maps_for_plots = [model.sa_attention_history]
    elapsed = time.perf_counter() - t0
    if report:
        prof.report(console=console, top=5)
    return prof, elapsed


def _story_leak(console, steps: int):
    console.rule("[bold]1. A common OOM: attention maps kept for plots without .detach()")
    console.print("A DCAL model (SA blocks, attention rollout, GLCA, PWCA) trained for "
                  f"{steps} steps; the loop keeps model.sa_attention_history for plots, and the "
                  "model appends its maps without .detach().\n")
    bug, t_bug = _train(console, steps, detach_history=False, keep_maps=True,
                        budget=V100)
    console.rule("[bold]2. Fixed: .detach() the maps, keep only the current step's")
    fixed, t_fixed = _train(console, steps, detach_history=True, keep_maps=False, report=False,
                            budget=V100)
    verdict = ("[green]no findings[/]" if not fixed.findings else
               f"[red]{len(fixed.findings)} finding(s)[/]")
    t = Table(title="Bug vs fix (measured by memprof.track on this machine)", title_justify="left")
    for col in ("run", "peak", "live after last step", "growth / step", "findings", "wall"):
        t.add_column(col, justify="right" if col != "run" else "left")
    for name, prof, wall in (("bug", bug, t_bug), ("fixed", fixed, t_fixed)):
        # growth is its own finding, or said in the leak finding that explains it
        growth = next((f.evidence.get("slope_bytes_per_step") or
                       f.evidence.get("growth_bytes_per_step") for f in prof.findings
                       if {"slope_bytes_per_step", "growth_bytes_per_step"} & set(f.evidence)), 0)
        t.add_row(name, fmt_bytes(prof.peak), fmt_bytes(prof.steps[-1].live_at_end),
                  fmt_bytes(growth), str(len(prof.findings)), f"{wall:.1f} s")
    console.print(t)
    console.print(f"Fixed run: {verdict}.")
    _budget_verdict(console, bug, fixed)
    return bug, fixed


def _budget_verdict(console, bug, fixed) -> None:
    """Where a 16 GB V100 would have run out: both runs replayed against its usable memory."""
    b, f = bug.meta.get("budget") or {}, fixed.meta.get("budget") or {}
    proj = b.get("projection") or {}
    if b.get("failure"):
        when = f"at step {b['failure']['where']['step']}"
    elif proj.get("step") is not None:
        when = (f"at step ~{proj['step']} ({proj['method']}: step {proj['template_step']} "
                f"kept {fmt_bytes(proj['leak_bytes_per_step'])} alive)")
    else:
        when = "never in these steps"
    fix = (f"fits with {fmt_bytes(f['headroom'])} headroom and does not grow" if f.get("fits")
           and not f.get("projection") else "does not fit either")
    console.print(
        f"[bold]On a 16 GB V100[/] (memprof.track(..., budget=\"{V100}\"): this CPU run "
        f"replayed through the caching-allocator model with {fmt_bytes(b.get('capacity', 0))} "
        f"usable, an estimate): the bug runs out of memory [bold red]{when}[/]; the fix "
        f"{fix}. Seed 000's user, at the full DCAL-B/16 size on a V100, met this leak as "
        "`CUDA out of memory. Tried to allocate 226.00 MiB`.\n")


def _story_kernels(console):
    console.rule("[bold]3. The memory-critical core: fused attention vs the math baseline")
    rows = []
    for backend in ("math", "fused"):
        prof, wall = _train(console, 2, detach_history=True, keep_maps=False,
                            attention_backend=backend, report=False, config=KERNEL_MODEL,
                            batch=KERNEL_BATCH)
        cats = prof.breakdown("category")
        rows.append((backend, prof.peak, cats.get("activations", 0), wall))
    tokens = (KERNEL_MODEL["img_size"] // KERNEL_MODEL["patch_size"]) ** 2 + 1
    t = Table(title=f"DCAL training steps at DCAL's sequence length ({tokens} tokens, PWCA keys "
                    f"{2 * tokens}), batch {KERNEL_BATCH}, depth {KERNEL_MODEL['depth']}",
              title_justify="left")
    for col in ("attention", "peak", "activations at peak", "wall (2 steps)"):
        t.add_column(col, justify="right" if col != "attention" else "left")
    for backend, peak, act, wall in rows:
        t.add_row(backend, fmt_bytes(peak), fmt_bytes(act), f"{wall:.1f} s")
    console.print(t)
    ratio = rows[1][1] / rows[0][1] if rows[0][1] else float("nan")
    console.print(f"fused / math peak: {ratio:.2f} (on the CPU the fused path is PyTorch's "
                  "memory-efficient SDPA, and for PWCA memprof's chunked PyTorch loop; on CUDA it "
                  "runs memprof's Triton kernels)\n")
    return rows


def _story_recommend(console):
    """What `memprof recommend` says for dcal-vit-b16 on a 16 GB V100, effective batch 16."""
    from memprof.report.plan import print_plan, search_progress
    console.rule("[bold]4. What fits: dcal-vit-b16 on a 16 GB V100")
    console.print("memprof recommend --gpu v100-16gb --model dcal-vit-b16 --effective-batch 16"
                  " --base-lr 5e-4 --base-batch 512\n")
    t0 = time.perf_counter()
    with search_progress(console) as progress:
        plan = memprof.recommend(model="dcal-vit-b16", gpu="v100-16gb", effective_batch=16,
                                 base_lr=5e-4, base_batch=512, progress=progress)
    print_plan(plan, console)
    ok8 = [o for o in plan.options if o.micro_batch == 8 and o.checkpointing == "none"]
    ck = [o for o in plan.options if o.fits and o.checkpointing != "none"]
    verdict = ("was not estimated" if not ok8 else
               "fits" if any(o.fits for o in ok8) else "does not fit")
    sizes = ", ".join(f"{o.precision} {o.peak_reserved / GiB:.1f} GiB" for o in ok8)
    console.print(
        f"[dim]Seeds 000/001 on a 16 GB V100: micro-batch 8 without checkpointing "
        f"{verdict} here" + (f" ({sizes} reserved)" if ok8 else "")
        + f", and {'a' if ck else 'no'} checkpointed configuration reaches effective batch 16"
        + _best_words(plan.best) + f" ({time.perf_counter() - t0:.1f} s).[/]")
    return plan


def _best_words(best) -> str:
    """The ranked first option, in words: the sentence above named checkpointing, and the
    best option needs none at all in fp16 (a newcomer read that checkpointing was required)."""
    if best is None:
        return ""
    how = ("no checkpointing" if best.checkpointing == "none"
           else f"{best.checkpointing} checkpointing")
    return (f"; the best option is micro-batch {best.micro_batch} x {best.accumulation} in "
            f"{best.precision} with {how}")


#: seed 004's ending in a process of its own: a loop that keeps every step's loss (and its
#: graph) is killed as the kernel's OOM killer kills, once memprof has saved twice while it ran
KILLED_LOOP = """
import os, signal, time, torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
losses, saves = [], []
deadline = time.monotonic() + 60
while len(saves) < 2 and time.monotonic() < deadline:
    loss = torch.nn.functional.cross_entropy(model(torch.randn(32, 64)),
                                             torch.randint(0, 10, (32,)))
    opt.zero_grad(); loss.backward(); opt.step()
    losses.append(loss)   # for a plot later - the graph of every step with it
    if os.path.exists("train.memprof") and \\
            os.stat("train.memprof").st_mtime_ns not in saves:
        saves.append(os.stat("train.memprof").st_mtime_ns)
    time.sleep(0.002)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _story_killed(console):
    from memprof.report.ending import unfinished
    console.rule("[bold]5. Killed by the OOM killer (exit status 137): the profile is there anyway")
    console.print("A loop that keeps every loss, run as `memprof run --autosave 0.5 train.py`, "
                  "is killed with SIGKILL once memprof has saved while it ran - as the kernel's "
                  "OOM killer kills a process whose host ran out of memory (seed 004). Nothing "
                  "runs in a process after SIGKILL: no exit path can save.\n")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "train.py"), "w", encoding="utf-8") as f:
            f.write(KILLED_LOOP)
        r = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--autosave", "0.5",
                            "train.py"], cwd=d, capture_output=True, text=True, timeout=300)
        path = os.path.join(d, "train.memprof")
        prof = memprof.load(path) if os.path.exists(path) else None
    killed = r.returncode == -signal.SIGKILL
    console.print(f"$ memprof run --autosave 0.5 train.py  ->  exit status "
                  f"{128 + signal.SIGKILL if killed else r.returncode}"
                  f"{' (killed by SIGKILL)' if killed else ''}")
    if prof is None or not isinstance(prof.meta.get("partial"), dict):
        console.print("[red]no profile saved while it ran[/]")
        return prof
    console.print(f"$ memprof report train.memprof\n[bold red]{unfinished(prof.meta['partial'])}[/]")
    leak = next((f for f in prof.findings if f.kind == "retained_graph"), None)
    if leak is not None:
        console.print(f"[bold]held by {leak.holder}[/]: {leak.message.split(';')[0]} "
                      f"({time.perf_counter() - t0:.1f} s)\n")
    return prof


def run_demo(quick: bool = False) -> int:
    console = Console()
    t0 = time.perf_counter()
    console.print(Panel.fit(
        "[bold]memprof demo[/]: where the memory of a training step goes, who leaks it, and "
        "what fits.\nEvery number below is measured on this machine "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}) unless labelled an "
        "estimate."))
    _story_leak(console, steps=4 if quick else 6)
    _story_kernels(console)
    _story_recommend(console)
    _story_killed(console)
    console.print(f"[dim]demo finished in {time.perf_counter() - t0:.1f} s[/]")
    return 0
