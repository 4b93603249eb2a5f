"""Estimates against a real GPU: memprof's estimate of a training step (the CUDA kernels of the
GPU this runs on modelled on CPU fake tensors, nothing computed) vs the same step run on that
GPU and measured by PyTorch's caching allocator.

Per case (model x batch x precision x checkpointing; AdamW, first step and second step):
  measured   torch.cuda.max_memory_allocated / max_memory_reserved during the step, minus what
             was allocated / reserved before the model was built (the cuBLAS workspaces, made by
             a warm-up: they are checked once, on their own line)
  estimated  Estimator(model, ..., gpu=<this GPU>).step(...): peak_allocated / peak_reserved
             (first step), steady_peak_allocated (second step), minus the modelled workspaces
  time       the real step's median (CUDA events; steps 3..7) vs the plan's time model
             (memprof.plan.timing: an estimate from counted FLOPs and bytes; its utilisation
             figures are assumptions that this column checks)
Only a GPU can run this (skipped with a message otherwise).

    python benchmarks/estimate_on_gpu.py                 # writes results/estimate_on_gpu_<gpu>.*
    python benchmarks/estimate_on_gpu.py --cases vit-b16 --quick
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time

import torch

from _results import command, machine, save
from memprof.models import build_model
from memprof.plan.checkpoint import apply as apply_checkpointing
from memprof.plan.cuda_autocast import LOW_PRECISION_DTYPES
from memprof.plan.cuda_kernels import KernelScratch
from memprof.plan.estimate import Estimator, call_model, make_optimizer, split_batch
from memprof.plan.default_loss import default_loss
from memprof.plan.timing import micro_step_time, optimizer_time

HERE = os.path.dirname(os.path.abspath(__file__))
SEQ = 512


# ------------------------------------------------------------------------------ workloads
def bert_base(device):
    """bert-base for sequence classification from its sizes (random weights, SDPA attention),
    batches of SEQ tokens with the last 64 padded: an additive mask, so the memory-efficient
    SDPA kernel (flash takes no mask)."""
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                     num_attention_heads=12, intermediate_size=3072,
                     max_position_embeddings=SEQ, num_labels=2, attn_implementation="sdpa")
    model = BertForSequenceClassification(cfg).to(device)

    def make_batch(b):
        dev = next(model.parameters()).device
        dev = torch.device("cpu") if dev.type == "meta" else dev
        mask = torch.ones(b, SEQ, dtype=torch.long, device=dev)
        mask[:, -64:] = 0
        return {"input_ids": torch.randint(100, 30000, (b, SEQ), device=dev),
                "attention_mask": mask,
                "labels": torch.zeros(b, dtype=torch.long, device=dev)}, None
    return model, make_batch, None


def builtin(name, **kw):
    def build(device):
        wl = build_model(name, device=device, **kw)
        return wl.model, wl.make_batch, wl.loss_fn
    return build


#: label -> (builder(device) -> (model, make_batch, loss_fn), batches, precisions, policies)
CASES = {
    "mlp": (builtin("mlp"), (256,), ("fp32", "bf16"), ("none",)),
    "vit-b16": (builtin("vit-b16"), (32, 64), ("fp32", "bf16", "fp16"), ("none", "every")),
    "vit-b16 fused": (builtin("vit-b16", attention_backend="fused"), (64,), ("bf16",),
                      ("none", "every")),
    "dcal-vit-b16": (builtin("dcal-vit-b16"), (4, 8), ("fp16",), ("none", "every")),
    "dcal-vit-b16 fused": (builtin("dcal-vit-b16", attention_backend="fused"), (8,),
                           ("fp16",), ("none", "every")),
    "bert-base seq 512": (bert_base, (8, 16), ("fp32", "bf16"), ("none", "every")),
    "resnet-tiny": (builtin("resnet-tiny"), (64,), ("fp32", "fp16"), ("none",)),
}
QUICK = {"mlp": ((256,), ("bf16",), ("none",)), "vit-b16": ((32,), ("bf16",), ("none",))}


# ------------------------------------------------------------------------------ the real step
def warm_up() -> int:
    """Make the cuBLAS workspaces (forward thread, autograd thread) as any training step would,
    then free everything else -> the bytes they hold."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = torch.randn(64, 64, device="cuda", dtype=dtype, requires_grad=True)
        (w @ w).sum().backward()
        del w
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() - before


def run_real(build, batch, precision, policy, timed_steps):
    """The step on the GPU -> measured bytes and the median step time (s)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    alloc0, reserved0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model, make_batch, loss_fn = build("cuda")
    loss_fn = loss_fn or default_loss
    handle = apply_checkpointing(model, policy)
    opt = make_optimizer("adamw", model.parameters())
    low = LOW_PRECISION_DTYPES.get(precision)
    amp = (lambda: torch.autocast("cuda", dtype=low)) if low is not None else \
        contextlib.nullcontext
    out = {}
    times = []
    try:
        for i in range(2 + timed_steps):
            torch.cuda.synchronize()
            if i < 2:
                torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            inputs, targets = split_batch(make_batch(batch))
            with amp():
                loss = loss_fn(call_model(model, inputs), targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss, inputs, targets
            end.record()
            torch.cuda.synchronize()
            if i < 2:
                key = "first" if i == 0 else "steady"
                out[key] = torch.cuda.max_memory_allocated() - alloc0
                out[key + "_reserved"] = torch.cuda.max_memory_reserved() - reserved0
            else:
                times.append(start.elapsed_time(end) / 1e3)
    finally:
        handle.remove()
        del model, opt
    out["step_s"] = statistics.median(times) if times else None
    return out


def estimate(build, gpu, batch, precision, policy, cache):
    """The estimate of the same step (one Estimator per model, on the CPU) -> (the Estimate,
    the modelled step time in s, the modelled cuBLAS workspace bytes it includes)."""
    key = id(build)
    if key not in cache:
        torch.manual_seed(0)
        model, make_batch, loss_fn = build("cpu")
        cache.clear()
        est = Estimator(model, make_batch, loss_fn, optimizer="adamw", gpu=gpu)
        workspaces = sum(n for _, n in KernelScratch(est.kernel_target).persistent(model))
        cache[key] = est, workspaces
    est, workspaces = cache[key]
    e = est.step(batch, precision=precision, checkpointing=policy)
    trainable = est.trainable_params
    step_s = micro_step_time(e, gpu, precision, e.params_bytes)
    if step_s is not None:
        step_s += optimizer_time(gpu, e.params_bytes, trainable, 8 * trainable)
    return e, step_s, workspaces


# ------------------------------------------------------------------------------ the table
def err(est, meas):
    return est / meas - 1 if meas else float("nan")


def fmt_row(r) -> str:
    m = 2 ** 20
    t_meas = f"{r['measured_step_ms']:9.1f}" if r["measured_step_ms"] is not None else " " * 9
    t_est = f"{r['estimated_step_ms']:9.1f}" if r["estimated_step_ms"] is not None else " " * 9
    return (f"{r['model']:20s} {r['batch']:5d} {r['precision']:5s} {r['checkpointing']:6s} "
            f"{r['measured_peak'] / m:10.1f} {r['estimated_peak'] / m:10.1f} "
            f"{r['peak_error']:+7.1%} {r['measured_steady_peak'] / m:10.1f} "
            f"{r['estimated_steady_peak'] / m:10.1f} {r['steady_error']:+7.1%} "
            f"{r['measured_reserved'] / m:10.1f} {r['estimated_reserved'] / m:10.1f} "
            f"{r['reserved_error']:+7.1%} {t_meas} {t_est}  {r['sdpa']}")


HEADER = (f"{'model':20s} {'batch':>5s} {'prec':5s} {'ckpt':6s} "
          f"{'peak MiB':>10s} {'est.':>10s} {'error':>7s} {'step2 MiB':>10s} {'est.':>10s} "
          f"{'error':>7s} {'reserved':>10s} {'est.':>10s} {'error':>7s} {'step ms':>9s} "
          f"{'est. ms':>9s}  modelled kernels")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=None,
                    help="models to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="one small configuration per model")
    ap.add_argument("--timed-steps", type=int, default=5)
    ap.add_argument("--out", default=None,
                    help="results file stem (default benchmarks/results/estimate_on_gpu_<gpu>)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("estimate_on_gpu: needs a CUDA GPU (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    from memprof.plan.gpus import lookup
    gpu = lookup("auto")
    real_ws = warm_up()
    names = args.cases or (list(QUICK) if args.quick else list(CASES))
    rows, cache = [], {}
    print(HEADER, flush=True)
    for name in names:
        build, batches, precisions, policies = CASES[name]
        if args.quick and name in QUICK:
            batches, precisions, policies = QUICK[name]
        for policy in policies:
            for precision in precisions:
                for b in batches:
                    t0 = time.perf_counter()
                    e, est_s, ws = estimate(build, gpu, b, precision, policy, cache)
                    t1 = time.perf_counter()
                    real = run_real(build, b, precision, policy, args.timed_steps)
                    r = {"model": name, "batch": b, "precision": precision,
                         "checkpointing": policy,
                         "measured_peak": real["first"], "estimated_peak": e.peak_allocated - ws,
                         "measured_steady_peak": real["steady"],
                         "estimated_steady_peak": e.steady_peak_allocated - ws,
                         "measured_reserved": real["first_reserved"],
                         "estimated_reserved": e.peak_reserved - ws,
                         "measured_step_ms": real["step_s"] * 1e3 if real["step_s"] else None,
                         "estimated_step_ms": est_s * 1e3 if est_s else None,
                         "sdpa": ", ".join(f"{k} x{v}" for k, v in
                                           sorted(e.kernel_rules.items())) or "-",
                         "kernel_rules": e.kernel_rules, "modelled_workspaces": ws,
                         "estimate_wall_s": round(t1 - t0, 2),
                         "real_wall_s": round(time.perf_counter() - t1, 2)}
                    r["peak_error"] = err(r["estimated_peak"], r["measured_peak"])
                    r["steady_error"] = err(r["estimated_steady_peak"],
                                            r["measured_steady_peak"])
                    r["reserved_error"] = err(r["estimated_reserved"], r["measured_reserved"])
                    rows.append(r)
                    print(fmt_row(r), flush=True)
    modelled_ws = max(r["modelled_workspaces"] for r in rows)
    info = machine(gpu=torch.cuda.get_device_name(), gpu_entry=gpu.name,
                   cuda=torch.version.cuda)
    worst = max(abs(r["peak_error"]) for r in rows)
    worst_steady = max(abs(r["steady_error"]) for r in rows)
    worst_res = max(abs(r["reserved_error"]) for r in rows)
    timed = [r for r in rows if r["measured_step_ms"] and r["estimated_step_ms"]]
    ratios = sorted(r["estimated_step_ms"] / r["measured_step_ms"] for r in timed)
    lines = [f"# memprof estimates vs the same steps on a real GPU ({info['gpu']})",
             f"# machine: {info}", f"# command: {command()}", "",
             "MiB = 2**20 bytes, each measured as the caching allocator's max over the step "
             "minus what was allocated before the model was built; estimates minus the "
             "modelled cuBLAS workspaces (checked below). step ms: measured median of "
             f"{args.timed_steps} steps vs memprof.plan.timing's model (an estimate).", "",
             HEADER] + [fmt_row(r) for r in rows] + [
             "",
             f"cuBLAS workspaces after a warm-up (fp32/bf16/fp16 matmul forward + backward): "
             f"{real_ws / 2**20:.1f} MiB measured, {modelled_ws / 2**20:.1f} MiB modelled",
             f"worst |error| over {len(rows)} cases: first-step peak {worst:.1%}, second-step "
             f"peak {worst_steady:.1%}, reserved {worst_res:.1%}"]
    if ratios:
        lines.append(f"time model / measured step time: median {statistics.median(ratios):.2f}, "
                     f"range {ratios[0]:.2f}-{ratios[-1]:.2f} over {len(ratios)} cases")
    text = "\n".join(lines)
    print("\n".join(lines[-3:]))
    slug = gpu.name.replace(" ", "_")
    out = args.out or os.path.join(HERE, "results", f"estimate_on_gpu_{slug}")
    save(out, text, {"machine": info, "command": command(), "rows": rows,
                     "cublas_workspaces": {"measured": real_ws, "modelled": modelled_ws},
                     "worst_abs_error": {"first": worst, "steady": worst_steady,
                                         "reserved": worst_res}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
