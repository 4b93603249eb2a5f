"""Accuracy of memprof.estimate: estimated vs measured peak of one training step.

For every built-in small model x two batch sizes x checkpointing (none, every), fp32, AdamW:
  measured  = memprof.track on a real CPU run of the first training step (batch created inside
              the block; forward, loss, backward, optimizer step creating its state, zero_grad)
              plus the model's buffers (they exist before tracking starts; the estimate counts
              them, as a GPU holds them)
  estimated = memprof.estimate (fake tensors, nothing computed) of the same step
Also reported: the estimate's wall time, the real step's wall time, the reserved bytes the
caching-allocator model predicts for the estimated step (no GPU here: not compared), and the
exactness of the batch interpolation used by `recommend` (predicted from batches 2 and 4 vs
an estimate at the larger batch).

GPU section (`--gpu-published`, benchmarks/estimate_gpu_published.py): estimates for the GPU a
source names against published GPU memory measurements, each cited in the results file.

    python benchmarks/estimate_accuracy.py            # writes benchmarks/results/estimate_accuracy.*
    python benchmarks/estimate_accuracy.py --with-vit-b16
    python benchmarks/estimate_accuracy.py --gpu-published   # writes .../estimate_gpu_published.*
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from _results import machine as _machine, save
from memprof.plan.batch_model import BatchModel
from memprof.plan.estimate import Estimator, measure_step
from memprof.models import build_model

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = {"mlp": (8, 32), "resnet-tiny": (16, 32), "vit-tiny": (4, 16),
         "dcal-vit-tiny": (4, 16)}


def machine() -> dict:
    return _machine(device="cpu (real runs); estimates model a CUDA device")


def fwd_bwd_peak(profile) -> int:
    """Peak live bytes during forward and backward (before the optimizer step)."""
    ph = profile.memory["phase"]
    mask = (ph == 1) | (ph == 2)
    return int(profile.live_bytes()[mask].max()) if mask.any() else 0


def measure(model, make_batch, loss_fn, batch, policy):
    return measure_step(model, make_batch, loss_fn, batch, checkpointing=policy)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--with-vit-b16", action="store_true", help="also vit-b16 at batch 2 and 4")
    ap.add_argument("--gpu-published", action="store_true",
                    help="the GPU section instead: published GPU measurements vs estimates")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "estimate_accuracy"))
    args = ap.parse_args(argv)
    if args.gpu_published:
        import estimate_gpu_published
        return estimate_gpu_published.main([])
    cases = dict(CASES)
    if args.with_vit_b16:
        cases["vit-b16"] = (2, 4)
    rows = []
    for name, batches in cases.items():
        torch.manual_seed(0)
        model, make_batch, loss_fn = build_model(name)
        est = Estimator(model, make_batch, loss_fn, optimizer="adamw")
        for policy in ("none", "every"):
            for b in batches:
                e = est.step(b, checkpointing=policy)
                real, wall = measure(model, make_batch, loss_fn, b, policy)
                measured = real.peak + e.buffers_bytes
                rows.append({"model": name, "batch": b, "checkpointing": policy,
                             "measured_peak": measured, "estimated_peak": e.peak_allocated,
                             "error": e.peak_allocated / measured - 1,
                             "measured_fwd_bwd_peak": fwd_bwd_peak(real) + e.buffers_bytes,
                             "estimated_fwd_bwd_peak": fwd_bwd_peak(e.profile),
                             "estimated_reserved": e.peak_reserved,
                             "estimate_wall_s": round(e.wall_s, 3),
                             "real_step_wall_s": round(wall, 3)})
                r = rows[-1]
                r["fwd_bwd_error"] = r["estimated_fwd_bwd_peak"] / r["measured_fwd_bwd_peak"] - 1
                print(f"{name:14s} b={b:3d} {policy:6s} measured {measured:>11d}  "
                      f"estimated {e.peak_allocated:>11d}  {rows[-1]['error']:+.2%}",
                      file=sys.stderr)
            lo, hi = est.step(2, checkpointing=policy), est.step(4, checkpointing=policy)
            big = max(batches) * 2
            actual = est.step(big, checkpointing=policy)
            pred = BatchModel(lo, hi).predict(big, 1)
            rows[-1]["interpolation"] = {
                "batch": big, "predicted_steady_peak": pred.peak_allocated,
                "estimated_steady_peak": actual.steady_peak_allocated,
                "predicted_reserved": pred.peak_reserved,
                "estimated_reserved": actual.steady_peak_reserved, "exact": pred.exact}
    worst = max(abs(r["error"]) for r in rows)
    worst_fb = max(abs(r["fwd_bwd_error"]) for r in rows)
    lines = [f"# memprof.estimate accuracy: estimated vs measured peak of one fp32 AdamW step "
             f"(first step, real run on the CPU measured by memprof.track)",
             f"# machine: {machine()}",
             f"# command: python benchmarks/estimate_accuracy.py"
             + (" --with-vit-b16" if args.with_vit_b16 else ""),
             "",
             "peak: of the whole step; fwd+bwd: of forward and backward only (before the "
             "optimizer step, where activations peak)",
             "",
             f"{'model':14s} {'batch':>5s} {'ckpt':6s} {'measured MiB':>13s} "
             f"{'estimated MiB':>14s} {'error':>8s} {'fwd+bwd meas.':>13s} "
             f"{'fwd+bwd est.':>12s} {'error':>8s} {'est. reserved':>13s} "
             f"{'estimate s':>10s} {'real step s':>11s}"]
    for r in rows:
        lines.append(f"{r['model']:14s} {r['batch']:5d} {r['checkpointing']:6s} "
                     f"{r['measured_peak'] / 2**20:13.3f} {r['estimated_peak'] / 2**20:14.3f} "
                     f"{r['error']:+8.2%} {r['measured_fwd_bwd_peak'] / 2**20:13.3f} "
                     f"{r['estimated_fwd_bwd_peak'] / 2**20:12.3f} {r['fwd_bwd_error']:+8.2%} "
                     f"{r['estimated_reserved'] / 2**20:13.3f} "
                     f"{r['estimate_wall_s']:10.2f} {r['real_step_wall_s']:11.2f}")
    lines.append("")
    lines.append(f"worst |error|: {worst:.2%} (whole step), {worst_fb:.2%} (fwd+bwd) over "
                 f"{len(rows)} cases; MiB = 2**20 bytes")
    lines.append("batch interpolation (recommend): steady-state peak predicted from batches 2 and "
                 "4 vs an estimate at the larger batch:")
    for r in rows:
        it = r.get("interpolation")
        if it:
            lines.append(f"  {r['model']:14s} {r['checkpointing']:6s} batch {it['batch']:3d}: "
                         f"predicted {it['predicted_steady_peak']} / reserved "
                         f"{it['predicted_reserved']}, estimated "
                         f"{it['estimated_steady_peak']} / {it['estimated_reserved']} "
                         f"({'exact' if it['exact'] else 'linear fit'})")
    text = "\n".join(lines)
    print(text)
    save(args.out, text, {"machine": machine(), "command": "python benchmarks/estimate_accuracy.py"
                          + (" --with-vit-b16" if args.with_vit_b16 else ""),
                          "rows": rows, "worst_abs_error": worst,
                          "worst_abs_error_fwd_bwd": worst_fb})
    return 0


if __name__ == "__main__":
    sys.exit(main())
