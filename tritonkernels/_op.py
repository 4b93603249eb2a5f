"""The fused attention as PyTorch custom ops in the `tritonkernels::` namespace.

    tritonkernels::flash_attention(q, k, v, k2?, v2?, q_index?, scale, want_weights)
        -> [out, lse] (+ [weights] when want_weights)
    tritonkernels::flash_attention_backward(dout, q, k, v, k2?, v2?, out, lse, q_index?, scale)
        -> [dq, dk, dv] (+ [dk2, dv2] with a second key source)

Why ops and not an autograd.Function: an op is one dispatch. Under FakeTensorMode (memprof's
estimates) each is ONE fake call whose outputs are exactly the Triton kernels' allocations,
instead of the dozens of aten ops of a PyTorch imitation; torch.compile keeps it opaque (no
graph break, no tracing into Triton); selective checkpointing sees it as one op to save or
recompute.

Real implementations: the Triton kernels (`_triton_attention.py`) on CUDA tensors, or on CPU
tensors under Triton's interpreter; otherwise the same algorithm in PyTorch ops
(`_chunked.py`). Both give lse in the kernels' convention: log2-sum-exp of the scaled scores.

The fake (and meta) implementation models the memory of the Triton kernels, read from their
launchers in `_triton_attention.py`, with M = R (rows of q_index) or Nq, N2 = 0 without kv2:
    forward   out      (B, H, M, D) in q's dtype, (B, M, H, D) memory order   `forward`
              lse      (B, H, M) float32                                        `forward`
              weights  (B, M, N1 + N2) in q's dtype, only when asked for        `head_mean`
    backward  dq       like q: `empty_like(q)`, `zeros_like(q)` with q_index     `backward`
              dk, dv   like k, v; dk2, dv2 like k2, v2                          `backward`
              delta    (B, H, M) float32, freed before backward returns: not an output, so
                       the fake cannot allocate it where an estimate sees it; it is the rule
                       `kernel_scratch_bytes` (for the plan's scratch accounting).
    saved for backward: q, k, v, (k2, v2), out, lse and q_index - what the kernels' backward
              reads (no probabilities, no concatenated keys, no gathered copy of q).
The kernels keep everything else (scores, probabilities, accumulators) in registers, and
allocate nothing through PyTorch besides the buffers above.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ._chunked import attention_vjp, chunk_rows, chunked_backward, chunked_forward, \
    gather_rows, scatter_rows

__all__ = ["FORWARD_OP", "BACKWARD_OP", "kernel_scratch_bytes", "triton_runs",
           "interpret_env", "interpreter_usable", "triton_module"]

#: log2(e): the kernels' lse is in base 2 (exp2 is their softmax's exponential)
LOG2E = 1.4426950408889634

_kernels = None  # the lazily imported _triton_attention module


def triton_module():
    """`_triton_attention`, imported on first use (its import decides interpret mode)."""
    global _kernels
    if _kernels is None:
        from . import _triton_attention as mod  # noqa: PLC0415
        _kernels = mod
    return _kernels


def interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def interpreter_usable() -> bool:
    """True when CPU tensors can run the Triton kernels: the interpreter is on now and the kernel
    module was (or will be) built under it."""
    if not interpret_env():
        return False
    if _kernels is not None:
        return bool(_kernels.INTERPRETED)
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def triton_runs(t: Tensor) -> bool:
    """Whether the Triton kernels can run on t's device."""
    return t.is_cuda or interpreter_usable()


def _rows(q, q_index) -> int:
    return q_index.shape[1] if q_index is not None else q.shape[2]


def _n_keys(k, k2) -> int:
    return k.shape[2] + (k2.shape[2] if k2 is not None else 0)


# ----------------------------------------------------------------------------- forward
@torch.library.custom_op("tritonkernels::flash_attention", mutates_args=())
def flash_attention(q: Tensor, k: Tensor, v: Tensor, k2: Optional[Tensor], v2: Optional[Tensor],
                    q_index: Optional[Tensor], scale: float, want_weights: bool) -> list[Tensor]:
    if triton_runs(q):
        kern = triton_module()
        with kern._device_guard(q):
            out, lse = kern.forward(q, k, v, k2, v2, q_index, scale)
            if want_weights:
                return [out, lse, kern.head_mean(q, k, k2, lse, q_index, scale)]
        return [out, lse]
    qs = gather_rows(q, q_index) if q_index is not None else q
    rows = chunk_rows(q.shape[1], qs.shape[2], _n_keys(k, k2))
    out, lse, weights = chunked_forward(qs, k, v, k2, v2, scale, want_weights, rows)
    lse.mul_(LOG2E)
    return [out, lse] if weights is None else [out, lse, weights]


@flash_attention.register_fake
def _flash_attention_fake(q, k, v, k2, v2, q_index, scale, want_weights):
    """The Triton forward's allocations (see the module docstring)."""
    B, H, _, D = q.shape
    M = _rows(q, q_index)
    out = q.new_empty((B, M, H, D)).transpose(1, 2)
    lse = q.new_empty((B, H, M), dtype=torch.float32)
    if want_weights:
        return [out, lse, q.new_empty((B, M, _n_keys(k, k2)))]
    return [out, lse]


# ----------------------------------------------------------------------------- backward
@torch.library.custom_op("tritonkernels::flash_attention_backward", mutates_args=())
def flash_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, k2: Optional[Tensor],
                             v2: Optional[Tensor], out: Tensor, lse: Tensor,
                             q_index: Optional[Tensor], scale: float) -> list[Tensor]:
    if triton_runs(q):
        kern = triton_module()
        with kern._device_guard(q):
            grads = kern.backward(dout, q, k, v, k2, v2, out, lse, q_index, scale)
    else:
        qs = gather_rows(q, q_index) if q_index is not None else q
        rows = chunk_rows(q.shape[1], qs.shape[2], _n_keys(k, k2))
        grads = chunked_backward(dout, qs, k, v, k2, v2, out, lse / LOG2E, scale, rows)
        if q_index is not None:
            grads = (scatter_rows(grads[0], q, q_index), *grads[1:])
    return [g for g in grads if g is not None]


@flash_attention_backward.register_fake
def _flash_attention_backward_fake(dout, q, k, v, k2, v2, out, lse, q_index, scale):
    """The Triton backward's outputs (its delta scratch: `kernel_scratch_bytes`)."""
    dq = torch.zeros_like(q) if q_index is not None else torch.empty_like(q)
    grads = [dq, torch.empty_like(k), torch.empty_like(v)]
    if k2 is not None:
        grads += [torch.empty_like(k2), torch.empty_like(v2)]
    return grads


FORWARD_OP = torch.ops.tritonkernels.flash_attention
BACKWARD_OP = torch.ops.tritonkernels.flash_attention_backward


def kernel_scratch_bytes(func, args) -> int:
    """Bytes a `tritonkernels::` op allocates on the GPU beyond its outputs and frees before it
    returns, for the op overload `func` called with `args`: the backward's delta
    (B, H, M) float32 (rowsum(dO * out), allocated first, live until the dQ kernel ends);
    0 for every other op (the forward allocates only its outputs)."""
    if func is BACKWARD_OP.default:
        out = args[6]
        return out.shape[0] * out.shape[1] * out.shape[2] * 4
    return 0


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    q, k, v, k2, v2, q_index, scale, _ = inputs
    out, lse = output[0], output[1]
    ctx.save_for_backward(q, k, v, k2, v2, out, lse, q_index)
    ctx.scale = scale
    ctx.mark_non_differentiable(*output[1:])  # lse and the head-mean weights
    ctx.set_materialize_grads(False)  # no zero-filled gradients for them


def _backward(ctx, grads):
    """The backward op; under create_graph (double backward) differentiable PyTorch math
    (`attention_vjp`), which materialises the probabilities as math attention does."""
    dout = grads[0]
    if dout is None:
        return (None,) * 8
    q, k, v, k2, v2, out, lse, q_index = ctx.saved_tensors
    if torch.is_grad_enabled():
        dq, dk, dv, dk2, dv2 = attention_vjp(dout, q, k, v, k2, v2, q_index, ctx.scale)
    else:
        g = BACKWARD_OP(dout, q, k, v, k2, v2, out, lse, q_index, ctx.scale)
        dq, dk, dv, dk2, dv2 = (*g, None, None)[:5]
    return dq, dk, dv, dk2, dv2, None, None, None


flash_attention.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- FLOPs
def _register_flops():
    """FLOP formulas (torch.utils.flop_counter, used by FlopCounterMode and memprof's
    estimates): attention over N1 + N2 keys counted as SDPA's are, plus the head-mean
    kernel's recomputed scores."""
    from torch.utils.flop_counter import (register_flop_formula, sdpa_backward_flop_count,
                                          sdpa_flop_count)

    def shapes(q, k, k2, q_index):
        B, H, _, D = q.shape
        keys = (B, H, _n_keys(k, k2), D)
        return (B, H, _rows(q, q_index), D), keys

    @register_flop_formula(FORWARD_OP, get_raw=True)
    def _forward_flops(q, k, v, k2, v2, q_index, scale, want_weights, *a, out_val=None, **kw):
        qs, keys = shapes(q, k, k2, q_index)
        n = sdpa_flop_count(qs, keys, keys)
        return n + (n // 2 if want_weights else 0)

    @register_flop_formula(BACKWARD_OP, get_raw=True)
    def _backward_flops(dout, q, k, v, k2, v2, out, lse, q_index, scale, *a, out_val=None,
                        **kw):
        qs, keys = shapes(q, k, k2, q_index)
        return sdpa_backward_flop_count(qs, qs, keys, keys)


_register_flops()
