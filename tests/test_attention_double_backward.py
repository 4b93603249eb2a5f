"""memprof.tritonkernels.attention: double backward (gradient penalties) and non-finite inputs.

Both backends, every path (SA, GLCA q_index, PWCA kv2, both, need_weights="head_mean"):
- a gradient penalty (first-order gradients taken with create_graph=True, then differentiated
  again) equals the float64 math reference (`reference_attention`);
- NaN in the inputs lands where math attention puts it, in the output, the head-mean weights
  and every gradient (the CPU flash kernel that SDPA runs turns a NaN query row into zeros; the
  torch backend must not).

The Triton kernels run under Triton's interpreter in ONE subprocess (`--worker`, with
TRITON_INTERPRET=1; see tests/test_attention_kernels.py for why a subprocess), the torch backend
in-process. Inputs are random per run: replay a failure with MEMPROF_TEST_SEED=<seed>, or one
check of the Triton side by hand with
    TRITON_INTERPRET=1 python tests/test_attention_double_backward.py --worker --check NAME
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest
import torch

from test_attention_kernels import rel_err

TOL = {"float32": 1e-4, "bfloat16": 3e-2}
B, H, N, N2, D, R = 2, 2, 13, 7, 16, 5

# name -> (kv2, q_index, need_weights, dtype)
PATHS = {
    "sa": (False, False, False, "float32"),
    "sa-head-mean": (False, False, True, "float32"),
    "glca": (False, True, False, "float32"),
    "pwca": (True, False, False, "float32"),
    "pwca-head-mean": (True, False, True, "float32"),
    "glca+pwca": (True, True, True, "float32"),
    "glca+pwca-bfloat16": (True, True, False, "bfloat16"),
}
# name -> (tensor index in q, k, v, k2, v2; (b, h, row) that gets one NaN); q-row is among the
# q_index rows of its batch element, q-row-unselected is not (GLCA never reads it)
NANS = {"q-row": (0, (0, 1, 3)), "q-row-unselected": (0, (1, 0, 3)), "k-row": (1, (1, 0, 4)),
        "v-row": (2, (0, 0, 6)), "k2-row": (3, (1, 1, 2))}


def _seed():
    return int(os.environ.get("MEMPROF_TEST_SEED", secrets.randbits(30)))


def _inputs(seed, dtype, device):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    leaves = [rnd(B, H, n, D).to(dtype) for n in (N, N, N, N2, N2)]
    # row 3 of batch 0 is selected (the NaN query row of NANS), row 3 of batch 1 is not
    q_index = torch.tensor([[3, 0, 11, 7, 5], [12, 1, 9, 4, 2]], device=device)
    return leaves, q_index, (rnd(B, H, R, D), rnd(B, H, N, D))


def _call(ls, path, q_index, backend):
    """attention() on the leaves ls for a path of PATHS; backend None: the float64 reference.
    Returns (out, head-mean weights or None)."""
    from memprof.tritonkernels import attention, reference_attention

    kv2, glca, weights = PATHS[path][:3]
    kw = dict(kv2=(ls[3], ls[4]) if kv2 else None, q_index=q_index if glca else None)
    if backend is None:
        out, w = reference_attention(ls[0], ls[1], ls[2], **kw)
        return out, w if weights else None
    res = attention(ls[0], ls[1], ls[2], need_weights="head_mean" if weights else None,
                    backend=backend, **kw)
    return res if weights else (res, None)


def _penalty_grads(path, leaves, q_index, dout, backend, upstream):
    """loss = <out, dout> + sum over inputs of |d<out, dout>/d input|^2 (first-order gradients
    taken with create_graph=True); returns d loss / d inputs. upstream="ones": out.sum(), as in
    the issue (a stride-0 upstream gradient)."""
    ls = [t.detach().clone().requires_grad_() for t in leaves]
    if not PATHS[path][0]:
        ls = ls[:3]
    out, w = _call(ls, path, q_index, backend)
    assert backend is None or w is None or not w.requires_grad, "weights carry a graph"
    first = out.sum() if upstream == "ones" else (out * dout.to(out.dtype)).sum()
    gs = torch.autograd.grad(first, ls, create_graph=True)
    assert all(g.requires_grad for g in gs), "first-order gradients carry no graph"
    loss = first + sum(g.float().pow(2).sum() for g in gs)
    return torch.autograd.grad(loss, ls)


def check_double_backward(backend, path, upstream="random", device="cpu"):
    """The gradient penalty's gradients equal the float64 reference's."""
    seed = _seed()
    dtype = PATHS[path][3]
    leaves, q_index, (dout_r, dout_n) = _inputs(seed, getattr(torch, dtype), device)
    dout = dout_r if PATHS[path][1] else dout_n
    got = _penalty_grads(path, leaves, q_index, dout, backend, upstream)
    ref = _penalty_grads(path, [t.double() for t in leaves], q_index, dout.double(), None,
                         upstream)
    errs = {f"grad{i}": rel_err(a, b) for i, (a, b) in enumerate(zip(got, ref))}
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, f"{backend} {path}: relative error above {TOL[dtype]}: {bad} (seed {seed})"


def check_nan(backend, path, where, device="cpu"):
    """A NaN in one input element gives NaN exactly where float64 math attention gives NaN, in
    out, weights and gradients; elsewhere the values agree with it."""
    seed = _seed()
    leaves, q_index, (dout_r, dout_n) = _inputs(seed, torch.float32, device)
    i, (b, h, row) = NANS[where]
    leaves[i][b, h, row, 5] = float("nan")
    dout = dout_r if PATHS[path][1] else dout_n
    results = []
    for be, dt in ((backend, torch.float32), (None, torch.float64)):
        ls = [t.detach().to(dt).clone().requires_grad_() for t in leaves]
        ls = ls if PATHS[path][0] else ls[:3]
        out, w = _call(ls, path, q_index, be)
        out.backward(dout.to(dt))
        results.append([out, w] + [t.grad for t in ls])
    names = ["out", "weights", "dq", "dk", "dv", "dk2", "dv2"]
    for name, a, r in zip(names, *results):
        if name == "weights" and r is None:
            continue
        assert a is not None and r is not None, f"{name} missing"
        nan_a, nan_r = torch.isnan(a), torch.isnan(r)
        assert torch.equal(nan_a, nan_r), (
            f"{backend} {path} NaN in {where}: {name} has NaN at {nan_a.sum()} places, math "
            f"attention at {nan_r.sum()} (seed {seed})")
        err = rel_err(a[~nan_a], r[~nan_r])
        assert err < TOL["float32"], f"{name}: relative error {err:.2e} off the NaN (seed {seed})"


def check_checkpoint_double_backward(backend, path, device="cpu"):
    """A gradient penalty through torch.utils.checkpoint (non-reentrant, which supports
    create_graph): the same gradients as without the checkpoint."""
    from torch.utils.checkpoint import checkpoint
    leaves, q_index, (dout_r, dout_n) = _inputs(_seed(), torch.float32, device)
    leaves = leaves if PATHS[path][0] else leaves[:3]
    dout = dout_r if PATHS[path][1] else dout_n

    def fn(*ls):
        return _call(ls, path, q_index, backend)[0]

    grads = []
    for use_ckpt in (False, True):
        ls = [t.clone().requires_grad_() for t in leaves]
        out = checkpoint(fn, *ls, use_reentrant=False) if use_ckpt else fn(*ls)
        gs = torch.autograd.grad((out * dout).sum(), ls, create_graph=True)
        assert all(g.requires_grad for g in gs), "first-order gradients carry no graph"
        ((out * dout).sum() + sum(g.pow(2).sum() for g in gs)).backward()
        grads.append([t.grad for t in ls])
    errs = [rel_err(a, b) for a, b in zip(*grads)]
    assert max(errs) < 1e-6, f"checkpointed gradient penalty differs: {errs}"


CHECKS = {f"double-backward-{p}": (check_double_backward, (p,)) for p in PATHS}
CHECKS["double-backward-pwca-out.sum"] = (check_double_backward, ("pwca", "ones"))
CHECKS["double-backward-sa-out.sum"] = (check_double_backward, ("sa", "ones"))
CHECKS.update({f"nan-{where}-{p}": (check_nan, (p, where))
               for where in NANS for p in ("sa-head-mean", "glca", "glca+pwca")
               if where != "k2-row" or PATHS[p][0]})
CHECKS.update({f"checkpoint-double-backward-{p}": (check_checkpoint_double_backward, (p,))
               for p in ("sa", "glca+pwca")})


# ============================================================================ the worker
def _worker(argv):
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from memprof.tritonkernels import _triton_attention as K

    only = argv[argv.index("--check") + 1] if "--check" in argv else None
    results = {}
    if not K.INTERPRETED:
        results["*"] = "Triton kernels were not built by the interpreter"
    K.POISON_OUTPUTS = True
    for name, (fn, args) in CHECKS.items():
        if "*" in results or (only and name != only):
            continue
        try:
            fn("triton", *args)
            results[name] = ""
        except Exception as e:  # noqa: BLE001  (report, keep going)
            results[name] = f"{type(e).__name__}: {e}"
    print("@@RESULTS@@" + json.dumps(results))


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(sys.argv)
    sys.exit(0)


# ============================================================================ pytest side
@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env,
                          capture_output=True, text=True, timeout=900)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULTS@@")), None)
    if proc.returncode != 0 or line is None:
        pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return json.loads(line[len("@@RESULTS@@"):])


@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_interpreted(interpreted, name):
    assert "*" not in interpreted, interpreted["*"]
    assert interpreted[name] == "", interpreted[name]


@pytest.mark.parametrize("name", list(CHECKS))
def test_torch_backend(name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fn, args = CHECKS[name]
    fn("torch", *args)


@pytest.mark.parametrize("name", [n for n in CHECKS if n.startswith("double-backward-pwca")])
def test_torch_backend_chunked_loop_several_chunks(name, monkeypatch):
    """The chunked loop's first-order backward over several chunks (5 query rows each) feeds
    the penalty's second backward."""
    from memprof.tritonkernels import _api
    monkeypatch.setattr(_api, "_chunk_rows", lambda *a: 5)
    fn, args = CHECKS[name]
    fn("torch", *args)


def test_torch_backend_one_source_is_sdpa_bitwise():
    """On the CPU with finite inputs, one key source still runs the kernel pair that
    scaled_dot_product_attention runs: out and gradients equal SDPA's bit for bit (qkv views,
    and a stride-0 upstream gradient, included)."""
    from memprof.tritonkernels import attention
    gen = torch.Generator().manual_seed(_seed())
    for dtype in (torch.float32, torch.bfloat16):
        fused = torch.randn(2, 21, 3, 2, 32, generator=gen).to(dtype)
        results = []
        for fn in (lambda q, k, v: attention(q, k, v, backend="torch"),
                   torch.nn.functional.scaled_dot_product_attention):
            x = fused.clone().requires_grad_()
            q, k, v = x.permute(2, 0, 3, 1, 4)
            out = fn(q, k, v)
            out.sum().backward()
            results.append((out, x.grad))
        assert all(torch.equal(a, b) for a, b in zip(*results)), dtype


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu(backend):
    """Every check on CUDA tensors: the compiled kernels (whose NaN handling in max / exp2 the
    interpreter's NumPy need not share) and the torch backend's CUDA path (the chunked loop)."""
    failures = {}
    for name, (fn, args) in CHECKS.items():
        try:
            fn(backend, *args, device="cuda")
        except AssertionError as e:
            failures[name] = str(e)
    assert not failures, failures
