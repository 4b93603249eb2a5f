"""Attention kernels benchmark: math attention vs PyTorch SDPA vs memprof's Triton kernels.

Sections
  kernels    SA, SA + head-mean weights (rollout), GLCA (top 10 % rows + CLS) and PWCA (keys of
             two images) at DCAL ViT-B/16 shapes (B, 12 heads, 785 tokens, d = 64; PWCA 1570
             keys), plus a sweep of N for SA. Per implementation: max relative error against a
             float64 reference (forward and every gradient, Frobenius-norm relative error),
             bytes saved for backward (saved_tensors_hooks, deduplicated by storage; "extra" =
             excluding the inputs' own storages), peak memory of forward + backward measured with
             memprof.track(), and time.
  dcal-step  Peak memory of one DCAL training step (forward + backward) at 448 px with
             dcal-vit-b16 shapes: math attention (the usual hand-written code; with and without
             the seed-000 history bug) vs fused attention, measured with memprof.track(), at
             each --dcal-batch; then memprof.estimate_step's estimate of the same step in fp32
             (checked against the measurement) and under CUDA fp16 AMP (the seeds' V100 setup,
             which a CPU cannot run: labelled as an estimate).

Timing: on a GPU, milliseconds, TFLOP/s (forward = 4 * B * H * Nq * Nk * d flops; forward +
backward counted as 3.5 x forward) and the speed-up over SDPA. On the CPU the Triton kernels run
in Triton's interpreter (TRITON_INTERPRET=1, set by this script): their time is NOT a performance
number and is not reported; memory and correctness are (the interpreter's own numpy temporaries
are not torch allocations, so memprof sees the tensors the kernels allocate; on a GPU the caching
allocator rounds each one up to its block size).
CPU times of math and SDPA are printed, labelled as CPU.

Usage
  python benchmarks/attention_kernels.py                 # both sections, full sweep
  python benchmarks/attention_kernels.py --quick         # small sweep, batch 1, reduced DCAL depth
  python benchmarks/attention_kernels.py --section dcal-step --depth 12 --dcal-batch 2 4
Results are printed and written to benchmarks/results/kernels_<device>[_quick].{txt,json}.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

if __name__ == "__main__" and not torch.cuda.is_available():
    # CPU: the Triton kernels can only run in the interpreter; it must be on before the kernel
    # module is imported (memprof.tritonkernels imports it lazily, on the first Triton call).
    # Only when run as the benchmark: imported (a test, a tool) it changes nobody's process.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import memprof  # noqa: E402
from memprof.tritonkernels import attention, reference_attention  # noqa: E402
from memprof.tritonkernels import concat_kv_gather_q  # noqa: E402

IMPLS = ("math", "sdpa", "triton")


# ============================================================================ implementations


def math_attention(q, k, v, kv2=None, q_index=None, weights=False):
    """What people write: explicit softmax(QK^T) per head."""
    q, k, v = concat_kv_gather_q(q, k, v, kv2, q_index)
    p = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
    out = torch.matmul(p, v)
    return (out, p.detach().mean(1)) if weights else out


def sdpa_attention(q, k, v, kv2=None, q_index=None, weights=False):
    """PyTorch scaled_dot_product_attention (concatenated keys / gathered rows);
    weights: probabilities recomputed without grad, one head at a time."""
    if weights:
        return attention(q, k, v, kv2=kv2, q_index=q_index, need_weights="head_mean",
                         backend="torch")
    q, k, v = concat_kv_gather_q(q, k, v, kv2, q_index)
    return F.scaled_dot_product_attention(q, k, v)


def triton_attention(q, k, v, kv2=None, q_index=None, weights=False):
    return attention(q, k, v, kv2=kv2, q_index=q_index,
                     need_weights="head_mean" if weights else None, backend="triton")


FNS = {"math": math_attention, "sdpa": sdpa_attention, "triton": triton_attention}


# ============================================================================ measurements
def _inputs(case, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    B, H, N, d = case["B"], case["H"], case["N"], case["d"]

    def rnd(n):
        return torch.randn(B, H, n, d, generator=g).to(device=device, dtype=dtype)

    leaves = [rnd(N), rnd(N), rnd(N)]
    if case.get("N2"):
        leaves += [rnd(case["N2"]), rnd(case["N2"])]
    q_index = None
    if case.get("R"):
        # CLS + the top R-1 rows of a random "rollout" score, as DCAL selects them
        score = torch.rand(B, N - 1, generator=g)
        top = torch.topk(score, case["R"] - 1, dim=-1).indices + 1
        q_index = torch.cat([torch.zeros(B, 1, dtype=torch.long), top], 1).to(device)
    M = case["R"] or N
    dout = torch.randn(B, H, M, d, generator=g).to(device=device, dtype=dtype)
    return leaves, q_index, dout


def _call(fn, leaves, q_index, weights):
    kv2 = (leaves[3], leaves[4]) if len(leaves) == 5 else None
    res = fn(leaves[0], leaves[1], leaves[2], kv2=kv2, q_index=q_index, weights=weights)
    return res if weights else (res, None)


def _rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def reference(leaves, q_index, dout, weights):
    ls = [t.detach().double().requires_grad_() for t in leaves]
    kv2 = (ls[3], ls[4]) if len(ls) == 5 else None
    out, w = reference_attention(ls[0], ls[1], ls[2], kv2=kv2, q_index=q_index)
    out.backward(dout.double())
    res = {"out": out.detach(), "grads": [t.grad for t in ls], "w": w if weights else None}
    del out, ls
    return res


def measure_memory(impl, case, leaves, q_index, dout, ref):
    """One forward + backward: saved-for-backward bytes, memprof peak, error vs reference."""
    fn = FNS[impl]
    weights = case.get("weights", False)
    ls = [t.detach().clone().requires_grad_() for t in leaves]
    input_storages = {t.untyped_storage().data_ptr() for t in ls}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()  # no reference kept: must not extend lifetimes
        return t

    gc.collect()
    peak, track_error = None, None
    try:
        with memprof.track() as prof:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out, w = _call(fn, ls, q_index, weights)
            out.backward(dout)
        peak = int(prof.peak)
        del prof
    except Exception as e:  # noqa: BLE001  reported in the table, never replaced by another number
        track_error = f"memprof.track failed: {type(e).__name__}: {e}"
        print(f"  {impl}: {track_error}", file=sys.stderr, flush=True)
        ls = [t.detach().clone().requires_grad_() for t in leaves]  # untracked: error + saved
        input_storages = {t.untyped_storage().data_ptr() for t in ls}
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, w = _call(fn, ls, q_index, weights)
        out.backward(dout)
    if ls[0].is_cuda:
        torch.cuda.synchronize()
    errs = [_rel(out, ref["out"])] + [_rel(t.grad, r) for t, r in zip(ls, ref["grads"])]
    if weights:
        errs.append(_rel(w, ref["w"]))
    finite = all(bool(torch.isfinite(t).all()) for t in [out] + [x.grad for x in ls])
    total = sum(saved.values())
    extra = sum(n for p, n in saved.items() if p not in input_storages)
    res = dict(max_rel_err=max(errs), finite=finite, saved_bytes=total, saved_extra_bytes=extra,
               peak_bytes=peak)
    if track_error:
        res["peak_error"] = track_error
    del out, w, ls
    return res


def measure_time(impl, case, leaves, q_index, dout, device, reps):
    """Milliseconds for forward and forward + backward (median of reps)."""
    fn = FNS[impl]
    weights = case.get("weights", False)
    ls = [t.detach().clone().requires_grad_() for t in leaves]

    def fwd():
        with torch.no_grad():
            _call(fn, ls, q_index, weights)

    def fwd_bwd():
        out, _ = _call(fn, ls, q_index, weights)
        out.backward(dout)

    res = {}
    for name, f in (("fwd_ms", fwd), ("fwd_bwd_ms", fwd_bwd)):
        f()  # warm-up (compilation on GPU)
        times = []
        for _ in range(reps):
            for t in ls:
                t.grad = None
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                f()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                f()
                times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        res[name] = times[len(times) // 2]
    return res


def flops_fwd(case):
    M = case["R"] or case["N"]
    nk = case["N"] + (case.get("N2") or 0)
    return 4.0 * case["B"] * case["H"] * M * nk * case["d"]


# ============================================================================ sections
def kernel_cases(args):
    B, H, N, d = args.batch, 12, 785, 64
    R = 1 + round(0.1 * (N - 1))  # CLS + 10 % of the 784 patches
    cases = [
        dict(name="SA", B=B, H=H, N=N, d=d, R=0, N2=0),
        dict(name="SA+weights", B=B, H=H, N=N, d=d, R=0, N2=0, weights=True),
        dict(name="GLCA", B=B, H=H, N=N, d=d, R=R, N2=0),
        dict(name="PWCA", B=B, H=H, N=N, d=d, R=0, N2=N),
    ]
    sweep = (197, 785) if args.quick else (197, 401, 785, 1201, 1569)
    for n in sweep:
        if n != N:
            cases.append(dict(name=f"SA N={n}", B=B, H=H, N=n, d=d, R=0, N2=0))
    return cases


def run_kernels(args, device, dtype, log):
    rows = []
    seed = int.from_bytes(os.urandom(4), "little") if args.seed is None else args.seed
    log(f"# kernels: dtype {str(dtype).replace('torch.', '')}, seed {seed}")
    for ci, case in enumerate(kernel_cases(args)):
        leaves, q_index, dout = _inputs(case, device, dtype, seed + ci)
        ref = reference(leaves, q_index, dout, case.get("weights", False))
        for impl in IMPLS:
            t0 = time.perf_counter()
            row = dict(case=case["name"], impl=impl, B=case["B"], H=case["H"], N=case["N"],
                       Nk=case["N"] + (case["N2"] or 0), M=case["R"] or case["N"], d=case["d"])
            row.update(measure_memory(impl, case, leaves, q_index, dout, ref))
            if device == "cuda" or impl != "triton":
                row.update(measure_time(impl, case, leaves, q_index, dout, device,
                                        reps=args.reps))
                row["time_kind"] = "gpu" if device == "cuda" else "cpu"
                if device == "cuda":
                    f = flops_fwd(case)
                    row["fwd_tflops"] = f / (row["fwd_ms"] * 1e-3) / 1e12
                    row["fwd_bwd_tflops"] = 3.5 * f / (row["fwd_bwd_ms"] * 1e-3) / 1e12
            else:
                row["time_kind"] = "interpreter (not a performance number)"
            rows.append(row)
            print(f"  {case['name']:>10} {impl:>6}: done in {time.perf_counter() - t0:.1f}s",
                  file=sys.stderr, flush=True)
        del ref, leaves
        gc.collect()
    # speed-up over SDPA (GPU only) and memory ratios
    by = {(r["case"], r["impl"]): r for r in rows}
    for r in rows:
        s = by[(r["case"], "sdpa")]
        m = by[(r["case"], "math")]
        r["peak_vs_math"] = (r["peak_bytes"] / m["peak_bytes"]
                             if r["peak_bytes"] and m["peak_bytes"] else None)
        if device == "cuda" and "fwd_bwd_ms" in r:
            r["speedup_vs_sdpa"] = s["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return rows, seed


def _mib(n):
    return f"{n / 2**20:,.1f}"


def format_kernels(rows, device):
    hdr = ["case", "impl", "M x Nk", "max rel err", "saved MiB", "saved extra MiB",
           "peak MiB", "peak/math"]
    if device == "cuda":
        hdr += ["fwd ms", "fwd+bwd ms", "fwd TFLOP/s", "f+b TFLOP/s", "x SDPA"]
    else:
        hdr += ["CPU fwd ms", "CPU fwd+bwd ms"]
    table = []
    for r in rows:
        line = [r["case"], r["impl"], f"{r['M']} x {r['Nk']}",
                f"{r['max_rel_err']:.1e}" + ("" if r["finite"] else " NaN!"),
                _mib(r["saved_bytes"]), _mib(r["saved_extra_bytes"]),
                _mib(r["peak_bytes"]) if r["peak_bytes"] is not None else "ERROR*",
                f"{r['peak_vs_math']:.2f}" if r["peak_vs_math"] is not None else "-"]
        if device == "cuda":
            line += [f"{r['fwd_ms']:.3f}", f"{r['fwd_bwd_ms']:.3f}", f"{r['fwd_tflops']:.1f}",
                     f"{r['fwd_bwd_tflops']:.1f}", f"{r['speedup_vs_sdpa']:.2f}"]
        elif "fwd_ms" in r:
            line += [f"{r['fwd_ms']:.1f}", f"{r['fwd_bwd_ms']:.1f}"]
        else:
            line += ["(interpreter)", "(interpreter)"]
        table.append(line)
    return _table(hdr, table)


def _table(hdr, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
    fmt = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(hdr), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def run_dcal_step(args, batch, device, dtype, log):
    from memprof.models import build_model

    kb = args.fused_kernel
    if kb == "auto":
        kb = "triton" if device == "cuda" else "torch"
    variants = [
        ("math", dict(attention_backend="math", detach_history=True)),
        ("math, detach_history=False (seed-000 bug)",
         dict(attention_backend="math", detach_history=False)),
        ("fused", dict(attention_backend="fused", kernel_backend=kb)),
    ]
    log(f"# dcal-step: dcal-vit-b16 shapes, img {args.img}, depth {args.depth}, batch "
        f"{batch}, dtype {str(dtype).replace('torch.', '')}; fused kernel backend: {kb}"
        + (" (memprof.tritonkernels.attention's PyTorch path on the CPU: SDPA, and its chunked "
           "loop for PWCA)"
           if kb == "torch" else ""))
    rows = []
    for label, kw in variants:
        torch.manual_seed(0)
        wl = build_model("dcal-vit-b16", img_size=args.img, depth=args.depth, **kw)
        model = wl.model.to(device=device, dtype=dtype).train()
        torch.manual_seed(1)
        (x1, x2), y = wl.make_batch(batch)
        n_params = sum(p.numel() for p in model.parameters())
        gc.collect()
        t0 = time.perf_counter()
        with memprof.track(model=model) as prof:
            loss = wl.loss_fn(model(x1, x2), y)
            loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        end_live = sum(prof.breakdown(at="end").values())
        by_cat = prof.breakdown(by="category", at="peak")
        interp = device != "cuda" and kw.get("kernel_backend") == "triton"
        rows.append(dict(variant=label, batch=batch, params=n_params, peak_bytes=int(prof.peak),
                         peak_by_category={k: int(v) for k, v in by_cat.items() if v},
                         peak_excl_params_bytes=int(prof.peak) - int(by_cat.get("parameters",
                                                                                0)),
                         live_after_step_bytes=int(end_live), loss=loss.item(),
                         tokens=model.num_tokens, wall_s=None if interp else wall,
                         time_kind=("interpreter (not a performance number)" if interp else
                                    "gpu" if device == "cuda" else "cpu (with tracking)")))
        print(f"  dcal-step {label}: peak {_mib(prof.peak)} MiB"
              + ("" if interp else f" in {wall:.1f}s"), file=sys.stderr, flush=True)
        del wl, model, loss, prof, x1, x2, y
        gc.collect()
    base = rows[0]["peak_bytes"]
    base_x = rows[0]["peak_excl_params_bytes"]
    for r in rows:
        r["peak_vs_math"] = r["peak_bytes"] / base
        r["peak_excl_params_vs_math"] = r["peak_excl_params_bytes"] / base_x
    return rows


def estimate_dcal_step(args, batch, precisions):
    """memprof.estimate_step (fake tensors, nothing allocated) of the same forward + backward for
    math and fused attention: fp32 checks the estimator against the rows measured above; fp16
    is the seeds' setting (a V100 with CUDA AMP), which this CPU cannot run."""
    from memprof.plan.estimate import estimate_step
    from memprof.models import build_model

    rows = []
    for precision in precisions:
        peaks = {}
        for backend in ("math", "fused"):
            kw = dict(attention_backend=backend)
            if backend == "fused":
                kw["kernel_backend"] = "torch"
            wl = build_model("dcal-vit-b16", img_size=args.img, depth=args.depth, **kw)
            est = estimate_step(wl.model, wl.make_batch, wl.loss_fn, batch_size=batch,
                                optimizer="none", precision=precision, count_flops=False)
            peaks[backend] = int(est.peak_allocated)
            del wl, est
            gc.collect()
        rows.append(dict(batch=batch, precision=precision, math_bytes=peaks["math"],
                         fused_bytes=peaks["fused"],
                         fused_vs_math=peaks["fused"] / peaks["math"]))
        print(f"  dcal-step estimate batch {batch} {precision}: math {_mib(peaks['math'])} MiB, "
              f"fused {_mib(peaks['fused'])} MiB", file=sys.stderr, flush=True)
    return rows


def format_dcal_estimates(rows, measured):
    """measured: {batch: {variant: peak bytes}} from the memprof.track() runs."""
    hdr = ["batch", "precision", "math MiB", "fused MiB", "fused/math", "measured fused/math",
           "estimate error math / fused"]
    table = []
    for r in rows:
        m = measured.get(r["batch"], {}) if r["precision"] == "fp32" else {}
        err = (f"{100 * (r['math_bytes'] / m['math'] - 1):+.1f}% / "
               f"{100 * (r['fused_bytes'] / m['fused'] - 1):+.1f}%") if m else "-"
        table.append([r["batch"], r["precision"] + (" AMP (CUDA policy)" if r["precision"] !=
                                                    "fp32" else ""),
                      _mib(r["math_bytes"]), _mib(r["fused_bytes"]), f"{r['fused_vs_math']:.3f}",
                      f"{m['fused'] / m['math']:.3f}" if m else "-", err])
    return _table(hdr, table)


def format_dcal(rows):
    hdr = ["variant", "tokens", "params (M)", "peak MiB", "peak/math", "peak-params MiB",
           "(peak-params)/math", "live after step MiB (incl. params)", "loss",
           f"{'GPU' if rows[0]['time_kind'] == 'gpu' else 'CPU'} s"]
    table = [[r["variant"], r["tokens"], f"{r['params'] / 1e6:.1f}", _mib(r["peak_bytes"]),
              f"{r['peak_vs_math']:.3f}", _mib(r["peak_excl_params_bytes"]),
              f"{r['peak_excl_params_vs_math']:.3f}", _mib(r["live_after_step_bytes"]),
              f"{r['loss']:.3f}",
              "(interpreter)" if r["wall_s"] is None else f"{r['wall_s']:.1f}"] for r in rows]
    return _table(hdr, table)


# ============================================================================ main
def machine(device, dtype):
    info = dict(platform=platform.platform(), python=platform.python_version(),
                cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                torch=torch.__version__, device=device, dtype=str(dtype).replace("torch.", ""),
                triton_interpret=os.environ.get("TRITON_INTERPRET", "0"))
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info["memprof_native"] = memprof._C.__file__  # which tracker build measured the peaks
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--section", choices=["all", "kernels", "dcal-step"], default="all")
    ap.add_argument("--quick", action="store_true", help="small sweep, batch 1, DCAL depth 2")
    ap.add_argument("--batch", type=int, default=None, help="kernels section batch size (default 2; quick 1)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="default bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--reps", type=int, default=None, help="timing repetitions")
    ap.add_argument("--img", type=int, default=448, help="dcal-step image size")
    ap.add_argument("--depth", type=int, default=None,
                    help="dcal-step SA blocks (default 12; quick 2)")
    ap.add_argument("--dcal-batch", type=int, nargs="+", default=None,
                    help="dcal-step batch sizes (default 2 4: the seeds' physical batches; "
                         "quick 1)")
    ap.add_argument("--estimate-precision", choices=["fp16", "bf16", "none"], default="fp16",
                    help="dcal-step: also estimate math vs fused under this CUDA AMP precision "
                         "(CPU float32 runs only)")
    ap.add_argument("--fused-kernel", choices=["auto", "triton", "torch"], default="auto",
                    help="dcal-step fused backend (auto: Triton on GPU, SDPA path on CPU)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", default=None, help="results file stem (default "
                    "benchmarks/results/kernels_<device>[_quick])")
    args = ap.parse_args(argv)
    args.batch = args.batch or (1 if args.quick else 2)
    args.depth = args.depth or (2 if args.quick else 12)
    args.dcal_batch = args.dcal_batch or ([1] if args.quick else [2, 4])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.reps = args.reps or (20 if device == "cuda" else (2 if args.quick else 3))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    torch.set_num_threads(os.cpu_count() or 1)

    lines: list[str] = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    info = machine(device, dtype)
    cmd = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    log(f"# memprof attention benchmark  {_dt.datetime.now().isoformat(timespec='seconds')}")
    log(f"# command: python {cmd}")
    log("# machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    log("# peak = memprof.track() peak of forward + backward (bytes allocated inside the block);"
        " saved = saved_tensors_hooks, deduplicated by storage; extra = not the inputs' storage;"
        " dcal-step: memprof.track(model=model), whose peak includes the parameters")
    result = dict(machine=info, command=f"python {cmd}", args=vars(args))
    if args.section in ("all", "kernels"):
        rows, seed = run_kernels(args, device, dtype, log)
        log(format_kernels(rows, device))
        if device != "cuda":
            log("# Triton rows on the CPU ran in Triton's interpreter: memory and error are "
                "real, time is not measured.")
        for r in rows:
            if r.get("peak_error"):
                log(f"# * {r['case']} / {r['impl']}: peak not measured - {r['peak_error']}")
        result["kernels"] = dict(seed=seed, rows=rows)
        log()
    if args.section in ("all", "dcal-step"):
        result["dcal_step"] = {}
        measured = {}
        for batch in args.dcal_batch:
            rows = run_dcal_step(args, batch, device, dtype, log)
            log(format_dcal(rows))
            fused = next(r for r in rows if r["variant"] == "fused")
            log(f"# dcal-step batch {batch}: fused / math peak = {fused['peak_vs_math']:.3f} "
                f"(target <= 0.5: {'met' if fused['peak_vs_math'] <= 0.5 else 'NOT met'}); "
                f"without the parameters (same in both): "
                f"{fused['peak_excl_params_vs_math']:.3f}")
            log()
            result["dcal_step"][f"batch_{batch}"] = dict(
                rows=rows, fused_vs_math=fused["peak_vs_math"],
                fused_vs_math_excl_params=fused["peak_excl_params_vs_math"])
            measured[batch] = {"math": rows[0]["peak_bytes"], "fused": fused["peak_bytes"]}
        if args.estimate_precision != "none" and device == "cpu" and dtype == torch.float32:
            log(f"# dcal-step estimates: memprof.estimate_step (fake tensors: ESTIMATES, not "
                f"measurements) of the same forward + backward at depth {args.depth}; fp32 is "
                f"checked against the measured peaks above; {args.estimate_precision} AMP is the "
                f"seeds' V100 setting (CUDA autocast: softmax kept in fp32)")
            est_rows = []
            for batch in args.dcal_batch:
                est_rows += estimate_dcal_step(args, batch, ["fp32", args.estimate_precision])
            log(format_dcal_estimates(est_rows, measured))
            result["dcal_step"]["estimates"] = est_rows

    stem = args.out or os.path.join(RESULTS, f"kernels_{device}" + ("_quick" if args.quick
                                                                       else ""))
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"# written {stem}.txt and {stem}.json", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
