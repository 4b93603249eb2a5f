"""Correctness of memprof.tritonkernels.attention (Triton kernels + PyTorch fallback).

How the Triton kernels are tested without a GPU: Triton decides at kernel-definition time whether
to compile or to interpret, from TRITON_INTERPRET. Other test modules may import triton (or our
kernels) first in the pytest process, so the interpreter checks run in ONE subprocess started by
the `interpreted` fixture: `python tests/test_attention_kernels.py --worker` with
TRITON_INTERPRET=1 in its environment. It runs every case in CASES and prints a JSON list; each
pytest test below asserts on one entry. Run a single case by hand with
    TRITON_INTERPRET=1 python tests/test_attention_kernels.py --worker --case NAME

Inputs are fresh random numbers on each run: the base seed is printed with any failure and can be
replayed with MEMPROF_TEST_SEED=<seed>. Error metric: relative error ||x - ref|| / ||ref||
(Frobenius) against a float64 reference computed on the same (upcast) inputs; thresholds 1e-4
for float32, 2e-2 for float16/bfloat16. The kernels' output buffers are poisoned with NaN before
every launch (`_triton_attention.POISON_OUTPUTS`), so an element a kernel forgets to write fails.

GPU code the interpreter cannot check (layouts, shared memory, ptxas) is compiled ahead of time
for sm_80 and sm_90 by `test_kernels_compile_for_cuda` (Triton's compiler, no GPU needed); tests
marked `gpu` run the compiled kernels when CUDA is available.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile

import pytest
import torch

TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}


def _case(name, dtype="float32", B=1, H=2, Nq=37, Nk=None, d=32, Nk2=0, R=0, weights=False,
          layout="separate", mag=1.0, grads=True, dout="random"):
    """grads=False: gradients are only checked for finiteness (saturated softmax: dq/dk are
    ill-conditioned there, a relative error against float64 means nothing)."""
    return dict(name=name, kind="accuracy", dtype=dtype, B=B, H=H, Nq=Nq,
                Nk=Nq if Nk is None else Nk, d=d, Nk2=Nk2, R=R, weights=weights, layout=layout,
                mag=mag, grads=grads, dout=dout)


def _accuracy_cases():
    cases = []
    for dt in ("float32", "float16", "bfloat16"):
        cases += [
            _case(f"plain-{dt}-N37-d32", dt, Nq=37, d=32, weights=True),
            _case(f"plain-{dt}-N70-d64", dt, B=2, H=2, Nq=70, d=64),
            _case(f"plain-{dt}-N37-d40", dt, Nq=37, d=40, weights=True),
            _case(f"pwca-{dt}-N37+29-d64", dt, Nq=37, Nk2=29, d=64, weights=True),
            _case(f"glca-{dt}-N70-R9-d64", dt, B=2, Nq=70, R=9, d=64, weights=True),
            _case(f"glca+pwca-{dt}-N37+20-R5-d40", dt, B=2, Nq=37, Nk2=20, R=5, d=40,
                  weights=True),
            _case(f"qkv-view-{dt}-N45-d32", dt, B=2, Nq=45, d=32, Nk2=17, R=6, weights=True,
                  layout="qkv_view"),
        ]
    cases += [
        _case("plain-float32-N70-d128", "float32", Nq=70, d=128, weights=True),
        _case("plain-float16-N50-d128", "float16", Nq=50, d=128),
        _case("plain-float32-N20-d8", "float32", Nq=20, d=8, weights=True),
        _case("cross-float32-Nq20-Nk45-d48", "float32", B=1, H=3, Nq=20, Nk=45, d=48,
              weights=True),
        _case("tiny-float32-Nq1-Nk1-kv2-1", "float32", Nq=1, Nk=1, Nk2=1, d=16, weights=True),
        _case("glca-float32-R1", "float32", Nq=33, R=1, d=32, weights=True),
        _case("pwca+glca-float32-expanded-dout", "float32", Nq=29, Nk2=13, R=4, d=32,
              dout="expanded"),
        _case("glca-float32-all-rows-permuted", "float32", Nq=24, R=24, d=32, weights=True),
        # peaked softmax, still well conditioned: everything compared
        _case("peaked-float16-mag3", "float16", Nq=37, Nk2=11, R=8, d=64, weights=True, mag=3.0),
        _case("peaked-float32-mag3", "float32", Nq=37, Nk2=11, d=32, weights=True, mag=3.0),
        # large-magnitude inputs: one-hot softmax, exp underflow everywhere else - no NaN/inf
        _case("extreme-float16-mag20", "float16", Nq=37, Nk2=11, d=64, weights=True, mag=20.0,
              grads=False),
        _case("extreme-bfloat16-mag30", "bfloat16", Nq=37, R=7, d=32, weights=True, mag=30.0,
              grads=False),
        _case("extreme-float32-mag50", "float32", Nq=37, d=40, weights=True, mag=50.0,
              grads=False),
    ]
    return cases


CASES = _accuracy_cases() + [
    dict(name="deterministic-bitwise-float16", kind="determinism"),
    dict(name="checkpoint-reentrant", kind="checkpoint", use_reentrant=True),
    dict(name="checkpoint-nonreentrant", kind="checkpoint", use_reentrant=False),
    dict(name="triton-matches-torch-backend", kind="backends"),
    dict(name="saved-tensors-only-qkv-out-lse", kind="saved"),
    # own subprocess: it runs inside the native tracker, a crash there must not hide the rest
    dict(name="memprof-peak-has-no-NxN", kind="memprof", isolated=True),
]


# ============================================================================ shared helpers
def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().double()
    ref = ref.detach().double()
    den = ref.norm().item()
    num = (x - ref).norm().item()
    if den == 0.0:
        return num
    return num / den


def _make_inputs(c, dtype, device, gen):
    """Leaves (what gets gradients) and a function leaves -> attention kwargs."""
    B, H, Nq, Nk, d, Nk2 = c["B"], c["H"], c["Nq"], c["Nk"], c["d"], c["Nk2"]

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * c["mag"]).to(device=device, dtype=dtype)

    if c["layout"] == "qkv_view":  # views of one fused projection, as a ViT makes them
        assert Nq == Nk
        leaves = [rnd(B, Nq, 3, H, d)]
        if Nk2:
            leaves.append(rnd(B, Nk2, 2, H, d))

        def split(ls):
            qkv = ls[0].permute(2, 0, 3, 1, 4)
            kw = dict(q=qkv[0], k=qkv[1], v=qkv[2])
            if Nk2:
                kv = ls[1].permute(2, 0, 3, 1, 4)
                kw["kv2"] = (kv[0], kv[1])
            return kw
    else:
        leaves = [rnd(B, H, Nq, d), rnd(B, H, Nk, d), rnd(B, H, Nk, d)]
        if Nk2:
            leaves += [rnd(B, H, Nk2, d), rnd(B, H, Nk2, d)]

        def split(ls):
            kw = dict(q=ls[0], k=ls[1], v=ls[2])
            if Nk2:
                kw["kv2"] = (ls[3], ls[4])
            return kw
    q_index = None
    if c["R"]:
        q_index = torch.stack([torch.randperm(Nq, generator=gen)[:c["R"]] for _ in range(B)])
        q_index = q_index.to(device)
    return leaves, split, q_index


def _weights_floor(rkw, dtype: str) -> float:
    """The error that fp32 arithmetic alone leaves in the probabilities exp(s - lse): an
    absolute error in a score s (the kernels recompute s in another tile order than the
    forward that saved lse) is a relative error of that size in its probability, so the fp32
    rounding of the largest |s| (|s| x 2^-24) is the floor. The mag-50 case reaches scores of ~12,000: floor 7e-4; seen
    on an H200, 1.3e-4 (the interpreter's numpy dot happens to agree with itself closer)."""
    if dtype != "float32":
        return 0.0
    q = rkw["q"].detach()
    keys = [rkw["k"].detach()] + ([rkw["kv2"][0].detach()] if "kv2" in rkw else [])
    top = max(float((q @ k.transpose(-1, -2)).abs().max()) for k in keys) / q.shape[-1] ** 0.5
    return top * 2.0 ** -24


def run_accuracy_case(c, seed, device="cpu", backend="auto"):
    """Run one accuracy case; returns dict(ok, errors, msg)."""
    from memprof.tritonkernels import attention, reference_attention

    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, c["dtype"])
    leaves, split, q_index = _make_inputs(c, dtype, device, gen)
    leaves = [t.requires_grad_() for t in leaves]
    kw = split(leaves)
    res = attention(kw["q"], kw["k"], kw["v"], kv2=kw.get("kv2"), q_index=q_index,
                    need_weights="head_mean" if c["weights"] else None, backend=backend)
    out, w = res if c["weights"] else (res, None)
    M = c["R"] or c["Nq"]
    problems = []
    if tuple(out.shape) != (c["B"], c["H"], M, c["d"]):
        problems.append(f"out shape {tuple(out.shape)}")
    if c.get("dout") == "expanded":  # out.sum().backward(): a stride-0 upstream gradient
        dout = torch.ones((), device=device, dtype=dtype).expand(out.shape)
    else:
        dout = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
    out.backward(dout)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rkw = split(ref_leaves)
    ref_out, ref_w = reference_attention(rkw["q"], rkw["k"], rkw["v"], kv2=rkw.get("kv2"),
                                         q_index=q_index)
    ref_out.backward(dout.double())

    errors = {"out": rel_err(out, ref_out)}
    finite = {"out": bool(torch.isfinite(out).all())}
    if w is not None:
        if w.requires_grad or w.grad_fn is not None:
            problems.append("weights carry a graph")
        if tuple(w.shape) != (c["B"], M, c["Nk"] + c["Nk2"]):
            problems.append(f"weights shape {tuple(w.shape)}")
        errors["weights"] = rel_err(w, ref_w)
        finite["weights"] = bool(torch.isfinite(w).all())
    for i, (t, r) in enumerate(zip(leaves, ref_leaves)):
        if t.grad is None:
            problems.append(f"grad {i} missing")
            continue
        if c["grads"]:
            errors[f"grad{i}"] = rel_err(t.grad, r.grad)
        finite[f"grad{i}"] = bool(torch.isfinite(t.grad).all())
    if q_index is not None and c["layout"] == "separate":
        # dq is zero outside the selected rows, exactly
        sel = torch.zeros(c["B"], c["Nq"], dtype=torch.bool, device=device)
        sel.scatter_(1, q_index, True)
        outside = leaves[0].grad.permute(0, 2, 1, 3)[~sel]
        if outside.numel() and bool((outside != 0).any()):
            problems.append("dq nonzero outside q_index rows")
    tol = TOL[c["dtype"]]
    tols = {k: tol for k in errors}
    # the output is the probabilities' weighted sum: their floor is its floor too (a mag-50
    # run read out 1.03e-4 against 1e-4 with its weights inside their floor, seed 761292965)
    for k in ("weights", "out"):
        if k in errors and (k == "weights" or c.get("mag", 1.0) > 10):
            tols[k] = max(tol, _weights_floor(rkw, c["dtype"]))
    bad = {k: v for k, v in errors.items() if not (v < tols[k])}
    nonfinite = [k for k, v in finite.items() if not v]
    if nonfinite:
        problems.append(f"non-finite values in {nonfinite}")
    if bad:
        problems.append("relative error above tolerance: " +
                        ", ".join(f"{k}={v:.2e} (tol {tols[k]:.1e})" for k, v in bad.items()))
    return dict(ok=not problems, errors=errors, msg="; ".join(problems))


class _DcalLikeBlock(torch.nn.Module):
    """SA with head-mean weights -> top rows by the CLS row -> GLCA + PWCA, with dropout."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.h = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.drop = torch.nn.Dropout(0.3)

    def split(self, x):
        B, N, C = x.shape
        t = self.qkv(x).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        return t[0], t[1], t[2]

    def forward(self, x, x2):
        from memprof.tritonkernels import attention
        B, N, C = x.shape
        q, k, v = self.split(self.drop(x))
        _, k2, v2 = self.split(x2)
        sa, w = attention(q, k, v, need_weights="head_mean")
        top = torch.topk(w[:, 0, 1:], 5, dim=-1).indices + 1
        g = attention(q, k, v, q_index=top)
        p = attention(q, k, v, kv2=(k2, v2))
        y = self.proj(self.drop(sa.transpose(1, 2).reshape(B, N, C)))
        y = y + self.proj(p.transpose(1, 2).reshape(B, N, C))
        return y.square().mean() + g.square().mean() * 3.0


def run_checkpoint_case(use_reentrant: bool, seed: int, device="cpu"):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(seed)
    blk = _DcalLikeBlock().to(device)
    x = torch.randn(2, 21, 32, device=device, requires_grad=True)
    x2 = torch.randn(2, 13, 32, device=device, requires_grad=True)

    def grads(fn):
        for t in [x, x2, *blk.parameters()]:
            t.grad = None
        torch.manual_seed(seed + 1)  # same dropout masks for both runs
        loss = fn()
        loss.backward()
        return loss.detach(), [t.grad.clone() for t in [x, x2, *blk.parameters()]]

    l0, g0 = grads(lambda: blk(x, x2))
    l1, g1 = grads(lambda: checkpoint(blk, x, x2, use_reentrant=use_reentrant))
    same = torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    worst = max(rel_err(b, a) for a, b in zip(g0, g1))
    return dict(ok=bool(same), errors={"max_grad_rel_diff": worst},
                msg="" if same else f"checkpointed grads differ (max rel diff {worst:.2e})")


def run_determinism_case(seed: int, device="cpu"):
    from memprof.tritonkernels import attention

    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=torch.float16)  # noqa
    q, k, v, k2, v2 = mk(2, 2, 45, 32), mk(2, 2, 45, 32), mk(2, 2, 45, 32), mk(2, 2, 30, 32), \
        mk(2, 2, 30, 32)
    idx = torch.stack([torch.randperm(45, generator=gen)[:7] for _ in range(2)]).to(device)
    do = mk(2, 2, 7, 32)
    runs = []
    for _ in range(2):
        ls = [t.clone().requires_grad_() for t in (q, k, v, k2, v2)]
        out, w = attention(ls[0], ls[1], ls[2], kv2=(ls[3], ls[4]), q_index=idx,
                           need_weights="head_mean")
        out.backward(do)
        runs.append([out.detach(), w] + [t.grad for t in ls])
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    return dict(ok=bool(same), errors={}, msg="" if same else "two runs differ bitwise")


def run_backends_case(seed: int):
    """Triton (interpreted) and the PyTorch fallback agree on every feature (float32)."""
    from memprof.tritonkernels import attention

    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    base = [mk(2, 2, 29, 40), mk(2, 2, 29, 40), mk(2, 2, 29, 40), mk(2, 2, 18, 40),
            mk(2, 2, 18, 40)]
    idx = torch.stack([torch.randperm(29, generator=gen)[:6] for _ in range(2)])
    results = {}
    for be in ("triton", "torch"):
        ls = [t.clone().requires_grad_() for t in base]
        out, w = attention(ls[0], ls[1], ls[2], kv2=(ls[3], ls[4]), q_index=idx,
                           need_weights="head_mean", backend=be, scale=0.3)
        out.backward(torch.ones_like(out))
        results[be] = [out, w] + [t.grad for t in ls]
    errors = {f"t{i}": rel_err(a, b) for i, (a, b) in enumerate(zip(results["triton"],
                                                                      results["torch"]))}
    bad = {k: v for k, v in errors.items() if not v < 1e-4}
    return dict(ok=not bad, errors=errors, msg=f"backends disagree: {bad}" if bad else "")


def run_saved_case(seed: int):
    """Only q, k, v, (k2, v2), out, lse and q_index are saved; nothing N x N."""
    from memprof.tritonkernels import attention

    torch.manual_seed(seed)
    B, H, N, N2, d, R = 1, 2, 64, 32, 16, 8
    q, k, v = (torch.randn(B, H, N, d, requires_grad=True) for _ in range(3))
    k2, v2 = (torch.randn(B, H, N2, d, requires_grad=True) for _ in range(2))
    idx = torch.randperm(N)[:R][None]
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attention(q, k, v, kv2=(k2, v2), q_index=idx)
    expect = sorted([(B, H, N, d)] * 3 + [(B, H, N2, d)] * 2 + [(B, H, R, d), (B, H, R), (B, R)])
    ok = sorted(saved) == expect
    return dict(ok=ok, errors={}, msg="" if ok else f"saved {sorted(saved)}, expected {expect}")


def run_memprof_case(seed: int):
    """Forward + backward under memprof.track(): the peak stays far below one per-head N x N
    score matrix set (B*H*N*N floats), which math attention allocates several times over."""
    import memprof
    from memprof.tritonkernels import attention

    torch.manual_seed(seed)
    B, H, N, d = 1, 2, 256, 16
    q, k, v, k2, v2 = (torch.randn(B, H, N, d, requires_grad=True) for _ in range(5))
    do = torch.randn(B, H, N, d)
    nxn = B * H * N * N * 4
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:  # where a failing block's profile would go
        for label, kw in (("sa", {}), ("pwca", dict(kv2=(k2, v2)))):
            with memprof.track(path=os.path.join(tmp, f"{label}.memprof")) as prof:
                out = attention(q, k, v, **kw)
                out.backward(do)
            peaks[label] = int(prof.peak)
            del out
    ok = all(p < nxn // 2 for p in peaks.values())
    return dict(ok=ok, errors={f"peak_{k}_over_BHNN": v / nxn for k, v in peaks.items()},
                msg="" if ok else f"peaks {peaks} not below half of B*H*N*N*4 = {nxn}")


# ============================================================================ the worker
def _worker(argv):
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from memprof.tritonkernels import _triton_attention as K

    base = int(os.environ.get("MEMPROF_TEST_SEED", secrets.randbits(30)))
    only = argv[argv.index("--case") + 1] if "--case" in argv else None
    results = []
    if not K.INTERPRETED:
        print(json.dumps([dict(name="*", ok=False, seed=base,
                               msg="Triton kernels were not built by the interpreter")]))
        return
    K.POISON_OUTPUTS = True
    for i, c in enumerate(CASES):
        if (only and c["name"] != only) or (not only and c.get("isolated")):
            continue
        seed = base + i
        try:
            if c["kind"] == "accuracy":
                r = run_accuracy_case(c, seed, backend="triton")
            elif c["kind"] == "checkpoint":
                r = run_checkpoint_case(c["use_reentrant"], seed)
            elif c["kind"] == "determinism":
                r = run_determinism_case(seed)
            elif c["kind"] == "backends":
                r = run_backends_case(seed)
            elif c["kind"] == "saved":
                r = run_saved_case(seed)
            elif c["kind"] == "memprof":
                r = run_memprof_case(seed)
            else:
                raise AssertionError(c["kind"])
        except Exception as e:  # noqa: BLE001  (report, keep going)
            r = dict(ok=False, errors={}, msg=f"{type(e).__name__}: {e}")
        r.update(name=c["name"], seed=seed, base_seed=base)
        results.append(r)
    print("@@RESULTS@@" + json.dumps(results))


# (dtype, head dim, HAS_KV2, HAS_QIDX) variants compiled ahead of time for each CUDA arch
AOT_VARIANTS = {90: [("float16", 64, False, False), ("bfloat16", 64, True, True),
                     ("float32", 128, True, True), ("float16", 40, True, False),
                     ("bfloat16", 128, False, True)],
                80: [("bfloat16", 64, True, True), ("float32", 128, False, False)]}
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _compile_cuda(arch: int):
    """Compile every kernel to a cubin for `arch` with Triton's own compiler and ptxas - no GPU
    needed. Checks the GPU code paths the interpreter cannot (layouts, shared memory, ptxas)."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from memprof.tritonkernels import _triton_attention as K
    assert not K.INTERPRETED
    tdt = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
    ints = {"H", "M", "N", "N1", "N2", "col_offset"}
    report = []

    def build(fn, ptrs, consts, warps, stages):
        sig = {a: "constexpr" if a in consts else ptrs.get(a) or
               (("i32",) * 4 if a.startswith("strides_") else
                "i32" if a.startswith("stride") or a in ints else "fp32") for a in fn.arg_names}
        kern = triton.compile(ASTSource(fn, sig, constexprs=consts),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))
        report.append(dict(kernel=fn.__name__, consts={k: str(v) for k, v in consts.items()},
                           shared=kern.metadata.shared))

    for dt, D, kv2, qidx in AOT_VARIANTS[arch]:
        P, qi = "*" + tdt[dt], "*i64" if qidx else "*fp32"
        bd = K._block_d(D)
        bm, bn, w, st = K._fwd_config(bd, getattr(torch, dt))
        common = dict(D=D, HAS_QIDX=qidx, BLOCK_D=bd, UPCAST=False, PRECISION="ieee")
        build(K._fwd_kernel, dict(Q=P, K=P, V=P, K2=P, V2=P, QIDX=qi, O=P, LSE="*fp32"),
              dict(common, HAS_KV2=kv2, BLOCK_M=bm, BLOCK_N=bn), w, st)
        bm, bn, w, st = K._bwd_config(bd, getattr(torch, dt))
        build(K._bwd_dkdv_kernel, dict(Q=P, K=P, V=P, DO=P, LSE="*fp32", DELTA="*fp32", QIDX=qi,
                                       DK=P, DV=P), dict(common, BLOCK_M=bm, BLOCK_N=bn), w, st)
        build(K._bwd_dq_kernel, dict(Q=P, K=P, V=P, K2=P, V2=P, DO=P, LSE="*fp32",
                                     DELTA="*fp32", QIDX=qi, DQ=P),
              dict(common, HAS_KV2=kv2, BLOCK_M=bm, BLOCK_N=bn), w, st)
        build(K._head_mean_kernel, dict(Q=P, K=P, LSE="*fp32", QIDX=qi, W=P),
              dict(common, BLOCK_M=bm, BLOCK_N=bn), w, 1)
        build(K._bwd_preprocess, dict(O=P, DO=P, DELTA="*fp32"),
              dict(D=D, BLOCK_M=64, BLOCK_D=bd), 4, 1)
    print("@@RESULTS@@" + json.dumps(report))


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(sys.argv)
    sys.exit(0)
if __name__ == "__main__" and "--compile-cuda" in sys.argv:
    _compile_cuda(int(sys.argv[sys.argv.index("--compile-cuda") + 1]))
    sys.exit(0)


# ============================================================================ pytest side
def _run_worker(*extra):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", *extra],
                          env=env, capture_output=True, text=True, timeout=900)
    marker = "@@RESULTS@@"
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(marker)), None)
    if proc.returncode != 0 or line is None:
        pytest.fail(f"interpreter worker {' '.join(extra)} failed (rc={proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {r["name"]: r for r in json.loads(line[len(marker):])}


def _check(results, name):
    assert "*" not in results, results.get("*")
    r = results[name]
    assert r["ok"], (f"{name}: {r['msg']} | errors={r['errors']} | seed={r['seed']} "
                     f"(replay: MEMPROF_TEST_SEED={r['base_seed']} TRITON_INTERPRET=1 python "
                     f"tests/test_attention_kernels.py --worker --case {name})")


@pytest.fixture(scope="module")
def interpreted():
    return _run_worker()


@pytest.mark.parametrize("name", [c["name"] for c in CASES if not c.get("isolated")])
def test_triton_interpreted(interpreted, name):
    _check(interpreted, name)


@pytest.mark.parametrize("name", [c["name"] for c in CASES if c.get("isolated")])
def test_triton_interpreted_isolated(name):
    _check(_run_worker("--case", name), name)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(AOT_VARIANTS))
def test_kernels_compile_for_cuda(arch):
    """The kernels lower to sm_80 / sm_90 cubins (Triton compiler + ptxas, no GPU needed), within
    the architecture's shared-memory limit."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile-cuda",
                           str(arch)], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULTS@@")), None)
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    report = json.loads(line[len("@@RESULTS@@"):])
    assert len(report) == 5 * len(AOT_VARIANTS[arch])
    over = [r for r in report if r["shared"] > SMEM_LIMIT[arch]]
    assert not over, over


def _fresh_seed():
    return int(os.environ.get("MEMPROF_TEST_SEED", secrets.randbits(30)))


# ---------------------------------------------------------------- PyTorch fallback (in-process)
@pytest.mark.parametrize("c", [c for c in CASES if c["kind"] == "accuracy"
                               and c["dtype"] == "float32"], ids=lambda c: c["name"])
def test_torch_backend_accuracy(c):
    seed = _fresh_seed()
    r = run_accuracy_case(c, seed, backend="torch")
    assert r["ok"], f"{r['msg']} | errors={r['errors']} | MEMPROF_TEST_SEED={seed}"


_TWO_SOURCE_CASES = [c for c in CASES if c["kind"] == "accuracy" and c["Nk2"]]


@pytest.mark.parametrize("rows_per_chunk", [5, None])
@pytest.mark.parametrize("c", _TWO_SOURCE_CASES, ids=lambda c: c["name"])
def test_torch_backend_two_sources_every_dtype(c, rows_per_chunk, monkeypatch):
    """kv2 on the torch backend runs the chunked loop: every dtype, and several chunks of query
    rows (5 rows each) as well as the default chunking."""
    from memprof.tritonkernels import _api
    if rows_per_chunk:
        monkeypatch.setattr(_api, "_chunk_rows", lambda *a: rows_per_chunk)
    seed = _fresh_seed()
    r = run_accuracy_case(c, seed, backend="torch")
    assert r["ok"], f"{r['msg']} | errors={r['errors']} | MEMPROF_TEST_SEED={seed}"


def test_torch_backend_two_sources_ignores_autocast():
    """Inside torch.autocast the chunked loop still computes in float32: the same output and
    gradients as outside it, bit for bit."""
    from memprof.tritonkernels import attention
    gen = torch.Generator().manual_seed(_fresh_seed())
    leaves = [torch.randn(2, 2, n, 32, generator=gen).bfloat16() for n in (30, 30, 30, 21, 21)]
    results = []
    for autocast in (False, True):
        xs = [t.clone().requires_grad_() for t in leaves]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = attention(xs[0], xs[1], xs[2], kv2=(xs[3], xs[4]), backend="torch")
        out.float().square().sum().backward()
        results.append([out] + [t.grad for t in xs])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_torch_backend_two_sources_saves_no_concatenation():
    """PWCA on the torch backend keeps k and k2 apart: no saved tensor spans both key sources
    or is N x N, and the saved bytes are those of q, k, v, k2, v2, out and lse."""
    from memprof.tritonkernels import attention
    B, H, N, N2, d = 2, 3, 40, 24, 16
    q, k, v = (torch.randn(B, H, N, d, requires_grad=True) for _ in range(3))
    k2, v2 = (torch.randn(B, H, N2, d, requires_grad=True) for _ in range(2))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, w = attention(q, k, v, kv2=(k2, v2), need_weights="head_mean", backend="torch")
    shapes = [s for s, _ in saved.values()]
    assert not any(len(s) == 4 and s[2] == N + N2 for s in shapes), shapes
    assert not any(s[-2:] == (N, N + N2) or s[-2:] == (N, N) for s in shapes), shapes
    expect = 4 * (3 * B * H * N * d + 2 * B * H * N2 * d + B * H * N * d + B * H * N)
    assert sum(n for _, n in saved.values()) == expect
    out.sum().backward()
    assert all(t.grad is not None for t in (q, k, v, k2, v2))


def test_fake_tensors_with_q_index():
    """Under FakeTensorMode (memprof's estimates) q_index has no values to validate: the call
    still runs, with the right output shapes, for one and for two key sources."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from memprof.tritonkernels import attention
    with FakeTensorMode():
        q, k, v = (torch.randn(2, 3, 20, 16, requires_grad=True) for _ in range(3))
        k2, v2 = (torch.randn(2, 3, 11, 16) for _ in range(2))
        idx = torch.zeros(2, 4, dtype=torch.int64)
        for kv2 in (None, (k2, v2)):
            out, w = attention(q, k, v, kv2=kv2, q_index=idx, need_weights="head_mean",
                               backend="torch")
            assert tuple(out.shape) == (2, 3, 4, 16)
            assert tuple(w.shape) == (2, 4, 20 + (11 if kv2 else 0))
            out.sum().backward()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_torch_backend_checkpoint(use_reentrant, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # auto -> torch on the CPU
    seed = _fresh_seed()
    r = run_checkpoint_case(use_reentrant, seed)
    assert r["ok"], f"{r['msg']} | MEMPROF_TEST_SEED={seed}"


def test_auto_backend_on_cpu_without_interpreter(monkeypatch):
    from memprof.tritonkernels import attention
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 2, 9, 16, requires_grad=True)
    out = attention(q, q, q)
    assert out.grad_fn is not None and "FlashAttentionFunction" not in type(out.grad_fn).__name__
    with pytest.raises(ValueError, match="backend='triton'.*CUDA"):
        attention(q, q, q, backend="triton")


# ---------------------------------------------------------------- argument errors
def _qkv(B=1, H=2, N=8, d=16, dtype=torch.float32):
    return [torch.randn(B, H, N, d, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda q, k, v: _attn()(q.double(), k.double(), v.double()), TypeError,
     r"^q: unsupported dtype torch.float64; expected float32, float16 or bfloat16$"),
    (lambda q, k, v: _attn()(q, k.half(), v), TypeError, r"^k: dtype torch.float16 differs"),
    (lambda q, k, v: _attn()(q.int(), k, v), TypeError, r"^q: unsupported dtype torch.int32"),
    (lambda q, k, v: _attn()(*_qkv(d=160)), ValueError,
     r"^q: head dim 160 is not supported; expected d <= 128$"),
    (lambda q, k, v: _attn()(q[0], k, v), ValueError, r"^q: expected a 4-D tensor"),
    (lambda q, k, v: _attn()(q, k[:, :1], v), ValueError, r"^k: shape \(1, 1, 8, 16\) does not "
     r"match q"),
    (lambda q, k, v: _attn()(q, k, v[:, :, :5]), ValueError, r"^v: 5 keys but k has 8"),
    (lambda q, k, v: _attn()(q, k, v[..., :8]), ValueError, r"^v: shape .* does not match q"),
    (lambda q, k, v: _attn()(q, k.to("meta"), v), ValueError,
     r"^k: on device meta but q is on cpu; expected one device$"),
    (lambda q, k, v: _attn()(q, k, v, kv2=k), TypeError, r"^kv2: expected a pair \(k2, v2\)"),
    (lambda q, k, v: _attn()(q, k, v, kv2=(k, v[:, :, :3])), ValueError,
     r"^kv2: v2 has 3 keys but k2 has 8"),
    (lambda q, k, v: _attn()(q, k, v, kv2=(k.half(), v.half())), TypeError,
     r"^kv2\[0\] \(k2\): dtype torch.float16 differs"),
    (lambda q, k, v: _attn()(q, k, v, q_index=torch.tensor([[0.0, 1.0]])), TypeError,
     r"^q_index: expected dtype int64"),
    (lambda q, k, v: _attn()(q, k, v, q_index=[[0, 1]]), TypeError,
     r"^q_index: expected an int64 tensor"),
    (lambda q, k, v: _attn()(q, k, v, q_index=torch.tensor([0, 1])), ValueError,
     r"^q_index: expected shape \(B=1, R>=1\), got \(2,\)$"),
    (lambda q, k, v: _attn()(q, k, v, q_index=torch.tensor([[0, 8]])), ValueError,
     r"^q_index: values must lie in \[0, 8\)"),
    (lambda q, k, v: _attn()(q, k, v, q_index=torch.tensor([[-1, 3]])), ValueError,
     r"^q_index: values must lie in \[0, 8\)"),
    (lambda q, k, v: _attn()(q, k, v, q_index=torch.tensor([[2, 5, 2]])), ValueError,
     r"^q_index: duplicate row indices"),
    (lambda q, k, v: _attn()(q, k, v, need_weights=True), ValueError,
     r"^need_weights: expected None or 'head_mean', got True$"),
    (lambda q, k, v: _attn()(q, k, v, scale="x"), TypeError, r"^scale: expected a finite real"),
    (lambda q, k, v: _attn()(q, k, v, scale=float("nan")), TypeError, r"^scale: expected"),
    (lambda q, k, v: _attn()(q, k, v, backend="cuda"), ValueError,
     r"^backend: expected one of \('auto', 'triton', 'torch'\), got 'cuda'$"),
])
def test_errors(call, exc, pattern):
    q, k, v = _qkv()
    with pytest.raises(exc, match=pattern) as info:
        call(q, k, v)
    assert "\n" not in str(info.value)


def _attn():
    from memprof.tritonkernels import attention
    return attention


# ---------------------------------------------------------------- GPU (compiled Triton)
@pytest.fixture
def poisoned_outputs():
    """The kernels' output buffers start as NaN: an element a kernel forgets to write fails."""
    from memprof.tritonkernels import _triton_attention as K
    K.POISON_OUTPUTS = True
    yield
    K.POISON_OUTPUTS = False


@pytest.mark.gpu
@pytest.mark.parametrize("c", [c for c in CASES if c["kind"] == "accuracy"],
                         ids=lambda c: c["name"])
def test_gpu_accuracy(c, poisoned_outputs):
    seed = _fresh_seed()
    r = run_accuracy_case(c, seed, device="cuda", backend="triton")
    assert r["ok"], f"{r['msg']} | errors={r['errors']} | MEMPROF_TEST_SEED={seed}"


@pytest.mark.gpu
def test_gpu_deterministic_and_checkpoint(poisoned_outputs):
    seed = _fresh_seed()
    r = run_determinism_case(seed, device="cuda")
    assert r["ok"], f"{r['msg']} | MEMPROF_TEST_SEED={seed}"
    for reentrant in (True, False):
        r = run_checkpoint_case(reentrant, seed, device="cuda")
        assert r["ok"], f"{r['msg']} | MEMPROF_TEST_SEED={seed}"


@pytest.mark.gpu
def test_gpu_dcal_shapes_bf16(poisoned_outputs):
    """SA / GLCA / PWCA at DCAL ViT-B/16 shapes (785 tokens, d=64) against float64."""
    c = _case("dcal-sa", "bfloat16", B=2, H=12, Nq=785, d=64, weights=True)
    for cc in (c, dict(c, R=79), dict(c, Nk2=785)):
        r = run_accuracy_case(cc, _fresh_seed(), device="cuda", backend="triton")
        assert r["ok"], r


@pytest.mark.gpu
@pytest.mark.parametrize("c", _TWO_SOURCE_CASES, ids=lambda c: c["name"])
def test_gpu_torch_backend_two_sources(c):
    """backend='torch' on CUDA tensors (the chunked loop for kv2) against float64."""
    seed = _fresh_seed()
    r = run_accuracy_case(c, seed, device="cuda", backend="torch")
    assert r["ok"], f"{r['msg']} | errors={r['errors']} | MEMPROF_TEST_SEED={seed}"
