"""`attention()`: flash-style attention with PWCA (kv2), GLCA (q_index) and head-mean weights.

Semantics (both backends):

    keys   = cat(k, k2) along the key axis (k2 only when kv2 is given; never materialised by the
             Triton kernels, which loop over both sources)
    values = cat(v, v2)
    qs     = q[:, :, q_index[b]] for each batch b when q_index is given (GLCA), else q
    out    = softmax(qs @ keys^T * scale) @ values                 (B, H, M, d), M = R or Nq
    probs  = mean over heads of softmax(qs @ keys^T * scale)       (B, M, Nk + Nk2), detached

Backends:
    "triton": the custom op `tritonkernels::flash_attention` (`_op.py`): the Triton kernels on
              CUDA tensors, or on CPU tensors when Triton's interpreter is on
              (``TRITON_INTERPRET=1`` in the environment before this package first runs a
              kernel). Fake and meta tensors (memprof's estimates) always take this op: its fake
              implementation allocates what the Triton kernels allocate on the GPU.
    "torch":  PyTorch ops with the same semantics. One key source: `scaled_dot_product_attention`
              (memory-efficient on CPU: it saves out and logsumexp, no N x N probabilities); for
              head_mean the probabilities are computed under no_grad, one head at a time. Two
              sources (kv2), and inputs holding NaN or inf: `ChunkedAttentionFunction`, the
              kernels' algorithm in PyTorch ops, one chunk of query rows at a time, so k and k2
              are never concatenated.
    "auto":   CUDA, fake or meta -> "triton"; CPU -> "triton" when TRITON_INTERPRET=1, else
              "torch".

The Triton path saves only q, k, v, (k2, v2), out, the per-row log-sum-exp and q_index for
backward; it is deterministic (no atomics; bitwise reproducible) and free of side effects, so
`torch.utils.checkpoint` recomputes it exactly.

Double backward (a backward with create_graph=True, e.g. a gradient penalty) is supported on
every path of both backends: under create_graph the gradients are computed with differentiable
PyTorch math in float32 (`attention_vjp`), which autograd differentiates again. That backward
materialises the B x H x M x (Nk + Nk2) probabilities, like math attention; a plain backward
is unaffected.

Non-finite inputs propagate as in math attention (both backends): a NaN in a query row gives a
NaN output row (and NaN weights in that row); a NaN key or value gives NaN in every row that
attends to it. The torch backend checks one-source inputs for NaN / inf (SDPA's CPU kernel
turns a NaN query row into zeros): three sums, and one device sync on CUDA.

q_index rows must be unique within each batch element: duplicate rows are rejected with a
ValueError (a top-R selection never has duplicates, and a unique-row scatter of dq keeps the
backward free of atomics). Validating q_index reads it on the host (one device sync on CUDA).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from . import _op
from ._chunked import attention_vjp, chunked_backward, chunked_forward, concat_kv_gather_q, \
    gather_rows
from ._chunked import chunk_rows as _chunk_rows  # a module global: tests patch the chunking
from ._op import interpret_env, interpreter_usable

__all__ = ["attention", "reference_attention", "SUPPORTED_DTYPES", "MAX_HEAD_DIM", "BACKENDS"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
BACKENDS = ("auto", "triton", "torch")
NEED_WEIGHTS = (None, "head_mean")

# ----------------------------------------------------------------------------- validation
def _check_tensor(name: str, t, ndim: int = 4) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor (B, H, N, d), got shape "
                         f"{tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: unsupported dtype {t.dtype}; expected float32, float16 or "
                        f"bfloat16")


def _has_values(t: torch.Tensor) -> bool:
    """False for tensors without data (FakeTensorMode, meta): their values cannot be checked."""
    if t.device.type == "meta":
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake  # noqa: PLC0415
    except ImportError:  # pragma: no cover  (older torch)
        return True
    return not is_fake(t)


def _validate(q, k, v, kv2, q_index, need_weights, scale, backend):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    k2 = v2 = None
    if kv2 is not None:
        if not isinstance(kv2, (tuple, list)) or len(kv2) != 2:
            raise TypeError(f"kv2: expected a pair (k2, v2) of tensors, got {type(kv2).__name__}")
        k2, v2 = kv2
        _check_tensor("kv2[0] (k2)", k2)
        _check_tensor("kv2[1] (v2)", v2)
    B, H, Nq, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"q: head dim {d} is not supported; expected d <= {MAX_HEAD_DIM}")
    if d < 1 or Nq < 1:
        raise ValueError(f"q: expected a non-empty (B, H, N, d) tensor, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v), ("kv2[0] (k2)", k2), ("kv2[1] (v2)", v2)):
        if t is None:
            continue
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}; expected all "
                            f"inputs in one dtype")
        if t.device != q.device:
            raise ValueError(f"{name}: on device {t.device} but q is on {q.device}; expected one "
                             f"device")
        if t.shape[0] != B or t.shape[1] != H or t.shape[3] != d:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match q {tuple(q.shape)}; "
                             f"expected (B={B}, H={H}, N, d={d})")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"v: {v.shape[2]} keys but k has {k.shape[2]}; expected equal lengths")
    if k.shape[2] < 1:
        raise ValueError("k: expected at least one key, got an empty key axis")
    if k2 is not None and k2.shape[2] != v2.shape[2]:
        raise ValueError(f"kv2: v2 has {v2.shape[2]} keys but k2 has {k2.shape[2]}; expected "
                         f"equal lengths")
    if need_weights not in NEED_WEIGHTS:
        raise ValueError(f"need_weights: expected None or 'head_mean', got {need_weights!r}")
    if scale is None:
        scale = d ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or \
            not math.isfinite(float(scale)):
        raise TypeError(f"scale: expected a finite real number or None, got {scale!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if q_index is not None:
        if not isinstance(q_index, torch.Tensor):
            raise TypeError(f"q_index: expected an int64 tensor (B, R), got "
                            f"{type(q_index).__name__}")
        if q_index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"q_index: expected dtype int64 (or int32), got {q_index.dtype}")
        if q_index.dim() != 2 or q_index.shape[0] != B or q_index.shape[1] < 1:
            raise ValueError(f"q_index: expected shape (B={B}, R>=1), got "
                             f"{tuple(q_index.shape)}")
        if q_index.device != q.device:
            raise ValueError(f"q_index: on device {q_index.device} but q is on {q.device}; "
                             f"expected one device")
        if q_index.shape[1] > Nq:
            raise ValueError(f"q_index: R={q_index.shape[1]} rows exceed the {Nq} query rows "
                             f"(rows must be unique)")
        if not _has_values(q_index):  # fake / meta tensors (memprof's estimates): shapes only
            return k2, v2, float(scale)
        srt = torch.sort(q_index, dim=1).values
        # both checks in one read back (on a GPU each read is a wait for the device); with one
        # row the duplicate check compares nothing and is False
        out_of_range, dup = torch.stack([((srt[:, 0] < 0) | (srt[:, -1] >= Nq)).any(),
                                         (srt[:, 1:] == srt[:, :-1]).any()]).tolist()
        if out_of_range:
            raise ValueError(f"q_index: values must lie in [0, {Nq}) (query rows of q), got "
                             f"min {int(srt[:, 0].min())}, max {int(srt[:, -1].max())}")
        if dup:
            raise ValueError("q_index: duplicate row indices within a batch element are not "
                             "supported; expected unique rows (e.g. a top-R selection)")
    return k2, v2, float(scale)


# ----------------------------------------------------------------------------- torch backend
def _saved_and_returned(ctx, saved, scale, out, weights):
    """The end of the torch backend's forward: save for backward; the head-mean weights carry
    no gradient."""
    ctx.save_for_backward(*saved)
    ctx.scale = scale
    if weights is not None:
        ctx.mark_non_differentiable(weights)
        return out, weights
    return out


def _all_finite(*ts) -> bool:
    """True when the tensors hold no NaN or inf, or hold no values to check (fake / meta
    tensors: only shapes matter there). A float32 sum is finite when the values are (an
    overflow past 3e38 errs on the safe side) and costs far less than isfinite().all()."""
    if not _has_values(ts[0]):
        return True
    with torch.no_grad():
        return bool(sum(t.sum(dtype=torch.float32) for t in ts).isfinite())


class SdpaDoubleBackward(torch.autograd.Function):
    """Identity on the output of `scaled_dot_product_attention`, whose backward kernels cannot
    be differentiated again. Inputs: out, qs, k, v, scale. A plain backward hands the gradient
    on to SDPA's own backward unchanged; under create_graph this node computes the gradients of
    qs, k and v itself (`attention_vjp`) and sends none into SDPA's backward."""

    @staticmethod
    def forward(ctx, out, qs, k, v, scale):
        ctx.save_for_backward(qs, k, v)  # the tensors SDPA saves: no extra memory
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate
            qs, k, v = ctx.saved_tensors
            dq, dk, dv, _, _ = attention_vjp(dout, qs, k, v, None, None, None, ctx.scale)
            return None, dq, dk, dv, None
        return dout, None, None, None, None


class ChunkedAttentionFunction(torch.autograd.Function):
    """The kernels' algorithm in PyTorch ops (`_chunked.py`): softmax over both key sources, one
    chunk of query rows at a time, saving only q, k, v, (k2, v2), out and the per-row
    log-sum-exp, so nothing N x N (and no concatenation of k with k2) outlives a chunk. Inputs:
    qs (the query rows that attend, already gathered), k, v, k2, v2 (None for one source),
    scale, want_weights. fp16 / bf16 inputs are computed in float32: k, v, k2, v2 are upcast
    once per call (a transient of their size in float32, and float32 gradient buffers in
    backward). Under create_graph the backward is `attention_vjp`."""

    @staticmethod
    def forward(ctx, qs, k, v, k2, v2, scale, want_weights):
        # float32 math even inside torch.autocast (it would run the matmuls in fp16 / bf16)
        ctx.device_type = qs.device.type
        rows = _chunk_rows(qs.shape[1], qs.shape[2], k.shape[2] + (
            k2.shape[2] if k2 is not None else 0))
        with torch.autocast(qs.device.type, enabled=False):
            out, lse, weights = chunked_forward(qs, k, v, k2, v2, scale, want_weights, rows)
        ctx.rows = rows
        return _saved_and_returned(ctx, (qs, k, v, k2, v2, out, lse), scale, out, weights)

    @staticmethod
    def backward(ctx, dout, *unused):
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate
            return (*attention_vjp(dout, *saved[:5], None, ctx.scale), None, None)
        with torch.autocast(ctx.device_type, enabled=False):
            return (*chunked_backward(dout, *saved, ctx.scale, ctx.rows), None, None)


@torch.no_grad()
def _head_mean_torch(qs, keys, scale):
    """mean_h softmax(qs keys^T * scale), accumulated one head at a time (B x M x N transient)."""
    B, H, M, _ = qs.shape
    acc = torch.zeros((B, M, keys.shape[2]), dtype=torch.float32, device=qs.device)
    for h in range(H):
        s = torch.matmul(qs[:, h].float() * scale, keys[:, h].float().transpose(-1, -2))
        acc.add_(torch.softmax(s, dim=-1))
    return acc.div_(H).to(qs.dtype)


def _torch_attention(q, k, v, k2, v2, q_index, scale, need_weights):
    """One source with finite values: PyTorch's memory-efficient SDPA (about twice as fast on
    the CPU as the chunked loop), behind `SdpaDoubleBackward`. Two sources (PWCA): the chunked
    loop, because SDPA would need k and k2 concatenated, and would save that copy for backward;
    NaN or inf: the chunked loop, which propagates them as math attention does."""
    qs = gather_rows(q, q_index) if q_index is not None else q
    want_weights = need_weights == "head_mean"
    if k2 is not None or not _all_finite(qs, k, v):
        return ChunkedAttentionFunction.apply(qs, k, v, k2, v2, scale, want_weights)
    out = F.scaled_dot_product_attention(qs, k, v, scale=scale)
    out = SdpaDoubleBackward.apply(out, qs, k, v, scale)
    if want_weights:
        return out, _head_mean_torch(qs.detach(), k.detach(), scale)
    return out


# ----------------------------------------------------------------------------- public
def _pick_backend(q: torch.Tensor, backend: str) -> str:
    if backend == "torch":
        return "torch"
    if q.is_cuda or not _has_values(q):  # fake / meta tensors: model the GPU's Triton kernel
        return "triton"
    if backend == "triton":
        if not interpreter_usable():
            kern = _op._kernels
            if interpret_env() and kern is not None and not kern.INTERPRETED:
                raise RuntimeError("backend='triton' on CPU tensors: the kernels were compiled "
                                   "before TRITON_INTERPRET=1 was set; set it before the first "
                                   "kernel call (e.g. at process start)")
            raise ValueError(f"backend='triton': expected CUDA tensors (got device {q.device}); "
                             f"CPU tensors need TRITON_INTERPRET=1")
        return "triton"
    return "triton" if interpreter_usable() else "torch"

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kv2=None,
              q_index: torch.Tensor | None = None, need_weights: str | None = None,
              scale: float | None = None, backend: str = "auto"):
    """Multi-head attention softmax(q k^T * scale) v without an N x N intermediate.

    Args:
        q, k, v: (B, H, Nq, d), (B, H, Nk, d), (B, H, Nk, d); float32, float16 or bfloat16,
            one dtype and one device; d <= 128 (any value; padded to a power of two in-kernel).
            Arbitrary strides are fine (e.g. views of a fused qkv projection); nothing is copied.
        kv2: optional (k2, v2), each (B, H, Nk2, d): PWCA. Queries attend to the keys of both
            sources, softmax-normalised jointly, as if k/v were concatenated along the key axis;
            k2 and v2 receive gradients.
        q_index: optional (B, R) int64 (int32 accepted): GLCA. Only rows q[b, :, q_index[b]]
            attend; the output is (B, H, R, d) in q_index order. dq has q's shape, zero outside
            the selected rows. Rows must be unique per batch element (ValueError otherwise).
        need_weights: None, or "head_mean" to also return the head-averaged attention
            probabilities, a (B, M, Nk + Nk2) tensor in q's dtype, detached (no grad).
        scale: softmax scale, default d ** -0.5.
        backend: "auto" (CUDA -> Triton; CPU -> Triton under TRITON_INTERPRET=1, else torch),
            "triton" or "torch".

    Returns:
        out (B, H, M, d), or (out, weights) when need_weights="head_mean".
    """
    k2, v2, scale = _validate(q, k, v, kv2, q_index, need_weights, scale, backend)
    want_weights = need_weights == "head_mean"
    if _pick_backend(q, backend) == "torch":
        return _torch_attention(q, k, v, k2, v2, q_index, scale, need_weights)
    res = _op.FORWARD_OP(q, k, v, k2, v2, q_index, scale, want_weights)
    return (res[0], res[2]) if want_weights else res[0]


def reference_attention(q, k, v, *, kv2=None, q_index=None, scale=None,
                        dtype: torch.dtype = torch.float64):
    """Plain math attention in `dtype` (default float64) with the same semantics; returns
    (out, head-mean probabilities). For tests and benchmarks: it materialises B x H x M x N."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    if kv2 is not None:
        kv2 = (kv2[0].to(dtype), kv2[1].to(dtype))
    q, k, v = concat_kv_gather_q(q.to(dtype), k.to(dtype), v.to(dtype), kv2, q_index)
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(p, v), p.mean(dim=1)
