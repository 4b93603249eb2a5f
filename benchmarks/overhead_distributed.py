"""Tracking overhead per rank in a 2-rank DDP job (gloo on the CPU): memprof.track vs untracked.

Each rank holds two DDP copies of the same model (one only ever trained untracked, one only
tracked, so the comm hook memprof gives a tracked DDP never touches the untracked one) and
trains them in interleaved rounds on the same batches; the ranks start every round together
(a barrier). Per rank: median step time with p10-p90 over the pooled steps, overhead vs
untracked, and the cost of leaving each track() block (building the profile, the checks).

    python benchmarks/overhead_distributed.py            # launches 2 ranks with torchrun
    python benchmarks/overhead_distributed.py --quick
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2, help="ranks (processes) on this machine")
    ap.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    ap.add_argument("--depth", type=int, default=4, help="hidden layers of the MLP")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8, help="steps per round and mode")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1, help="steps dropped from each round")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "overhead_distributed"))
    ap.add_argument("--launched-as", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.width = 4, 2, 512
    return args


def build(args) -> torch.nn.Module:
    torch.manual_seed(0)
    layers, d = [], args.width
    for _ in range(args.depth):
        layers += [torch.nn.Linear(d, d), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(d, 10))


def run_steps(model, opt, batches) -> list[float]:
    times = []
    for x, y in batches:
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def mode_untracked(workload, batches):
    return run_steps(*workload, batches), 0.0


def mode_tracked(workload, batches):
    import memprof
    model, opt = workload
    tracker = memprof.track(model, opt)
    tracker.__enter__()
    times = run_steps(model, opt, batches)
    t = time.perf_counter()
    tracker.__exit__(None, None, None)
    return times, time.perf_counter() - t


MODES = {"untracked": mode_untracked, "memprof.track": mode_tracked}


def worker(args) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    workloads = {}
    for m in MODES:
        model = DDP(build(args))
        workloads[m] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    gen = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(args.batch, args.width, generator=gen),
                torch.randint(0, 10, (args.batch,), generator=gen)) for _ in range(args.steps)]
    for m in MODES:   # warm up allocator caches and lazy optimizer state, untracked
        run_steps(*workloads[m], batches[:2])
    pooled = {m: [] for m in MODES}
    exits = {m: [] for m in MODES}
    for r in range(args.rounds):
        for m in (list(MODES) if r % 2 == 0 else list(reversed(MODES))):
            dist.barrier()
            times, exit_cost = MODES[m](workloads[m], batches)
            pooled[m] += times[args.warmup:]
            exits[m].append(exit_cost)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": rank, "pooled": pooled, "exits": exits})
    if rank == 0:
        report(args, gathered)
    dist.barrier()
    dist.destroy_process_group()


def report(args, per_rank) -> None:
    sys.path.insert(0, HERE)
    from _results import machine, save, step_cells, step_row
    rows = []
    for entry in per_rank:
        base = statistics.median(entry["pooled"]["untracked"])
        for m in MODES:
            rows.append({"rank": entry["rank"], "mode": m,
                         **step_row(entry["pooled"][m], base, entry["exits"][m])})
    cmd = args.launched_as or "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    info = machine(device="cpu", ranks=len(per_rank), backend="gloo")
    lines = [f"# memprof tracking overhead per rank, {len(per_rank)}-rank DDP (gloo): MLP "
             f"{args.depth}x{args.width}, batch {args.batch} per rank, {args.rounds} rounds x "
             f"{args.steps} steps, first {args.warmup} of each round dropped",
             f"# machine: {info}", f"# command: {cmd}", "",
             f"{'rank':>4s}  {'mode':16s} {'median ms':>10s} {'p10-p90 ms':>16s} "
             f"{'overhead':>9s} {'exit ms':>8s}"]
    for r in rows:
        lines.append(f"{r['rank']:4d}  {r['mode']:16s} {step_cells(r)}")
    text = "\n".join(lines)
    print(text)
    save(args.out, text, {"machine": info, "command": cmd, "args": vars(args), "rows": rows})


def launch(args, argv) -> None:
    """Start the ranks: this script again under torch.distributed's launcher."""
    from torch.distributed import run as torchrun
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + list(argv))
    torchrun.run(torchrun.get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(args.nproc), os.path.abspath(__file__)]
        + list(argv) + ["--launched-as", cmd]))


if __name__ == "__main__":
    argv = sys.argv[1:]
    parsed = parse(argv)
    if "RANK" in os.environ:
        worker(parsed)
    else:
        launch(parsed, argv)
