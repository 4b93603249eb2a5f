"""`memprof recommend` for N GPUs: a 7B Llama (built on meta) on 8 x A100-80GB under each
data-parallel strategy and layout - per-rank memory, what fits, estimated throughput and
communication.

    python benchmarks/recommend_distributed.py [--gpus 8] [--global-batch 64] [--seq 512]
                                               [--layout torch --layout zero-paper]

Every number in the table is an ESTIMATE of memprof.plan (fake-tensor steps, the rules of
memprof.plan.distributed, the time and communication models). Layouts (memprof.plan.
rank_layout): "torch" (the default) counts what the printed torch code allocates, "zero-paper"
DeepSpeed's layout. "states" is the layout's model states per GPU (parameters + gradients +
optimizer state, bytes per parameter of `Plan.assumptions["distributed"]`); "ZeRO paper" the
paper's (2 + 2 + 12) bytes per parameter divided by the stage. Saved with the machine and
command under benchmarks/results/recommend_distributed_7b.{txt,json}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "plan"))

import _results  # noqa: E402

GiB = 1 << 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--gpu", default="a100-80gb")
    ap.add_argument("--layout", action="append", choices=("torch", "zero-paper"),
                    help="repeatable (default: torch, then zero-paper)")
    args = ap.parse_args()
    import llm_factories
    import memprof
    from memprof.plan.distributed import STRATEGIES, data_parallel, zero_model_state_bytes

    rows, head = [], (f"{'layout':<10} {'strategy':<8} {'best (bf16)':<24} {'reserved/GPU':>12} "
                      f"{'headroom':>9} {'states':>8} {'ZeRO paper':>10} {'samples/s*':>10} "
                      f"{'tokens/s*':>10} {'comm exposed':>12} {'plan s':>7}")
    lines = [f"7B Llama (Llama-2-7B shape, seq {args.seq}) on {args.gpus} x {args.gpu}, global "
             f"batch {args.global_batch}, AdamW, bf16 - ESTIMATES (memprof.plan)", head]
    for layout, (name, s) in ((la, item) for la in (args.layout or ["torch", "zero-paper"])
                              for item in STRATEGIES.items()):
        t0 = time.perf_counter()
        plan = memprof.recommend(
            model=llm_factories.llama_7b, batch=lambda b: llm_factories.tokens(b, args.seq),
            gpu=args.gpu, effective_batch=args.global_batch, precisions=["bf16"],
            policies=["none", "every"], optimizer="adamw", base_lr=3e-4, base_batch=8,
            distributed=data_parallel(name, args.gpus, layout=layout))
        wall = time.perf_counter() - t0
        best = plan.best or min(plan.options, key=lambda o: o.peak_reserved)
        comm = best.communication or {}
        formula = zero_model_state_bytes(plan.total_params, s.zero_stage, args.gpus)
        per_param = plan.assumptions["distributed"]["bytes_per_parameter"]["bf16"]
        states = plan.total_params * sum(per_param[k] for k in (
            "parameters", "gradients", "optimizer_state"))
        row = {"layout": layout, "strategy": name, "fits": best.fits,
               "micro_batch": best.micro_batch,
               "accumulation": best.accumulation, "checkpointing": best.checkpointing,
               "peak_reserved_per_gpu": best.peak_reserved, "headroom": best.headroom,
               "model_states_per_gpu": states, "bytes_per_parameter": per_param,
               "zero_model_states_per_gpu": formula, "samples_per_s": best.samples_per_s,
               "comm_exposed_s": comm.get("exposed_s"), "comm_total_s": comm.get("total_s"),
               "lr": plan.lr.recommended_lr, "plan_wall_s": wall}
        rows.append(row)
        label = (f"{best.checkpointing}, {best.micro_batch} x {best.accumulation}"
                 if best.fits else f"nothing fits ({best.micro_batch} x {best.accumulation})")
        sps = best.samples_per_s or 0.0
        lines.append(f"{layout:<10} {name:<8} {label:<24} {best.peak_reserved / GiB:>10.1f} G "
                     f"{best.headroom / GiB:>+8.1f}G {states / GiB:>6.1f} G "
                     f"{formula / GiB:>8.1f} G {sps:>10.1f} "
                     f"{sps * args.seq:>10.0f} {1e3 * (comm.get('exposed_s') or 0):>9.1f} ms "
                     f"{wall:>7.1f}")
    lines.append(f"* estimated (time model: memprof.plan.timing; communication: a model over "
                 f"the GPU table's NVLink figure, memprof.plan.communication). LR for the global "
                 f"batch: {rows[0]['lr']:.3g} (a recipe of 3e-4 at batch 8 on one GPU, linear "
                 "rule).")
    info, cmd = _results.machine(), _results.command()
    lines += [f"machine: {info}", f"command: {cmd}"]
    text = "\n".join(lines)
    print(text)
    _results.save(os.path.join(HERE, "results", "recommend_distributed_7b"), text,
                  {"machine": info, "command": cmd, "rows": rows})


if __name__ == "__main__":
    main()
