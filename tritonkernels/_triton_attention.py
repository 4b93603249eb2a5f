"""Triton kernels for flash-style attention (forward, backward, head-mean probabilities).

Imported lazily by `_api.py`, only when the Triton backend is used: whether the kernels
are compiled (CUDA) or run by Triton's interpreter (CPU tensors, ``TRITON_INTERPRET=1``) is
decided by Triton when this module is imported, so `INTERPRETED` records which it was.

Layout conventions. Tensors that come from outside (inputs, dO, the saved out, which a saved-
tensor hook may hand back in another layout) and the gradients (allocated like their inputs)
may have arbitrary strides and are never made contiguous: a kernel takes each one's strides as
one argument, the tuple strides_<name> = t.stride(). Buffers the launchers allocate themselves have
fixed layouts that the kernels assume instead of taking their strides:
  q         (B, H, Nq, D)      queries
  k, v      (B, H, N1, D)      keys/values, source 1
  k2, v2    (B, H, N2, D)      keys/values, source 2 (PWCA), optional
  q_index   (B, R)             rows of q that attend (GLCA), optional; M = R, else M = Nq
  out       (B, H, M, D)       written as (B, M, H, D) memory, returned as a permuted view
                               (`_fwd_kernel` has no stride arguments for it)
  lse       (B, H, M) float32  contiguous; log2-sum-exp of the scaled scores (log2 domain, below)
  delta     (B, H, M) float32  contiguous; rowsum(dO * out), backward only
  w         (B, M, N1 + N2)    contiguous head-mean probabilities (one stride argument: its rows)

Softmax is evaluated in base 2: with qk_scale = scale * log2(e), p = exp2(qk * qk_scale - lse),
which equals exp(qk * scale - logsumexp_e). Nothing N x N is ever written except by
`_head_mean_kernel`, which writes the (B, M, N1 + N2) head-averaged probabilities on request.
No atomics anywhere: each output element is written by exactly one program, so results are
bitwise reproducible run to run.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton import knobs as _knobs
from triton.runtime.errors import OutOfResources

INTERPRETED: bool = bool(_knobs.runtime.interpret)

# Testing hook: when True, every buffer a kernel must fully write is filled with NaN first, so an
# element the kernel forgets to write shows up as NaN (tests set it; costs one fill per buffer).
POISON_OUTPUTS: bool = False

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with a float32 result. UPCAST: compute in fp32 (the interpreter cannot multiply
    bfloat16 blocks; exact for bf16/fp16 inputs, so numerics match a tensor-core fp32 accumulate)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _bh(bh, H):
    """(b, h) of the program bh = b * H + h, as 64-bit integers (offsets into large tensors)."""
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _program_block(H, size, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """For a program on the grid (cdiv(size, BLOCK), B * H): bh, b64, h64 (see `_bh`), its block
    of rows offs, offs_d = arange(BLOCK_D) and the rows' mask offs < size."""
    bh = tl.program_id(1)
    b64, h64 = _bh(bh, H)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return bh, b64, h64, offs, tl.arange(0, BLOCK_D), offs < size


@triton.jit
def _bh_base(P, strides, b64, h64):
    """P advanced to its (b, h) slice, the base of a (rows, d) matrix; strides: P's four."""
    return P + b64 * strides[0] + h64 * strides[1]


@triton.jit
def _tile(base, rows, row_mask, stride_r, cols, stride_c, n_cols):
    """Pointers and mask of the tile base[rows, cols] of a matrix: rows where row_mask, columns
    below n_cols (for a (rows, d) matrix: cols = offs_d, n_cols = D)."""
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    return ptrs, row_mask[:, None] & (cols < n_cols)[None, :]


# _load_tile / _store_tile repeat `_tile`'s two lines instead of calling it: they run in the
# inner loops, and Triton's interpreter pays about a millisecond per device-function call.
@triton.jit
def _load_tile(base, rows, row_mask, stride_r, cols, stride_c, n_cols):
    """The tile of `_tile`, zero outside its mask."""
    return tl.load(base + rows[:, None] * stride_r + cols[None, :] * stride_c,
                   mask=row_mask[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def _store_tile(base, rows, row_mask, stride_r, cols, stride_c, n_cols, x):
    """The tile of `_tile` = x, cast to base's element type."""
    tl.store(base + rows[:, None] * stride_r + cols[None, :] * stride_c,
             x.to(base.dtype.element_ty), mask=row_mask[:, None] & (cols < n_cols)[None, :])


@triton.jit
def _query_rows(QIDX, stride_ib, stride_ir, b, offs_m, m_mask, HAS_QIDX: tl.constexpr):
    """Row numbers of q for the compact rows offs_m (gathered through q_index for GLCA)."""
    if HAS_QIDX:
        rows = tl.load(QIDX + b.to(tl.int64) * stride_ib + offs_m * stride_ir, mask=m_mask, other=0)
    else:
        rows = offs_m.to(tl.int64)
    return rows


@triton.jit
def _query_block(Q, strides_q, QIDX, stride_ib, stride_ir, H, M,
                 D: tl.constexpr, HAS_QIDX: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """The block of (gathered) query rows of a program on the grid (cdiv(M, BLOCK_M), B * H):
    returns bh, b64, h64, offs_m (compact rows), offs_d, m_mask, rows (rows of q) and the q tile."""
    bh, b64, h64, offs_m, offs_d, m_mask = _program_block(H, M, BLOCK_M, BLOCK_D)
    rows = _query_rows(QIDX, stride_ib, stride_ir, b64, offs_m, m_mask, HAS_QIDX)
    q = _load_tile(_bh_base(Q, strides_q, b64, h64), rows, m_mask, strides_q[2], offs_d,
                   strides_q[3], D)
    return bh, b64, h64, offs_m, offs_d, m_mask, rows, q


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K, V, strides_k, strides_v, N, qk_scale,
               offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    """Online-softmax accumulation over the N keys of one source (K, V: its (b, h) bases)."""
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        k = _load_tile(K, offs_n, n_mask, strides_k[2], offs_d, strides_k[3], D)
        qk = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        # every block holds at least one valid key (start_n < N), so m_new is finite
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V, offs_n, n_mask, strides_v[2], offs_d, strides_v[3], D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, K2, V2, QIDX, O, LSE,
                strides_q, strides_k, strides_v, strides_k2, strides_v2,
                stride_ib, stride_ir, H, M, N1, N2, qk_scale,
                D: tl.constexpr, HAS_KV2: tl.constexpr, HAS_QIDX: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """out and lse for one block of (gathered) query rows. O has no stride arguments: it is the
    (B, M, H, D) buffer `forward` allocates, so its strides are (M*H*D, D, H*D, 1)."""
    bh, b64, h64, offs_m, offs_d, m_mask, rows, q = _query_block(
        Q, strides_q, QIDX, stride_ib, stride_ir, H, M, D, HAS_QIDX, BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, _bh_base(K, strides_k, b64, h64),
                               _bh_base(V, strides_v, b64, h64),
                               strides_k, strides_v, N1, qk_scale,
                               offs_d, D, BLOCK_N, UPCAST, PRECISION)
    if HAS_KV2:
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q,
                                   _bh_base(K2, strides_k2, b64, h64),
                                   _bh_base(V2, strides_v2, b64, h64),
                                   strides_k2, strides_v2, N2, qk_scale,
                                   offs_d, D, BLOCK_N, UPCAST, PRECISION)
    acc = acc / l_i[:, None]
    lse = m_i + tl.log2(l_i)

    # out's (b, h) matrix starts at (b*M*H + h)*D, its rows H*D apart (see the docstring)
    _store_tile(O + (b64 * M * H + h64) * D, offs_m, m_mask, H * D, offs_d, 1, D, acc)
    tl.store(LSE + bh.to(tl.int64) * M + offs_m, lse, mask=m_mask)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _bwd_preprocess(O, DO, DELTA,
                    strides_o, strides_do,
                    H, M, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, m] = sum_d dO * O (float32). O is the saved output, but a saved-tensor hook
    (e.g. offloading) may hand back another layout than `forward`'s, so it has strides."""
    bh, b64, h64, offs_m, offs_d, m_mask = _program_block(H, M, BLOCK_M, BLOCK_D)
    o = _load_tile(_bh_base(O, strides_o, b64, h64), offs_m, m_mask, strides_o[2],
                   offs_d, strides_o[3], D).to(tl.float32)
    do = _load_tile(_bh_base(DO, strides_do, b64, h64), offs_m, m_mask, strides_do[2],
                    offs_d, strides_do[3], D).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * M + offs_m, tl.sum(o * do, 1), mask=m_mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, QIDX, DK, DV,
                     strides_q, strides_k, strides_v, strides_do, strides_dk, strides_dv,
                     stride_ib, stride_ir, H, M, N, sm_scale, qk_scale,
                     D: tl.constexpr, HAS_QIDX: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV for one block of keys of one source, looping over all (gathered) query rows.
    Launched once per key source; the softmax normaliser (lse) already spans both sources."""
    bh, b64, h64, offs_n, offs_d, n_mask = _program_block(H, N, BLOCK_N, BLOCK_D)
    k = _load_tile(_bh_base(K, strides_k, b64, h64), offs_n, n_mask, strides_k[2],
                   offs_d, strides_k[3], D)
    v = _load_tile(_bh_base(V, strides_v, b64, h64), offs_n, n_mask, strides_v[2],
                   offs_d, strides_v[3], D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    q_base = _bh_base(Q, strides_q, b64, h64)
    do_base = _bh_base(DO, strides_do, b64, h64)
    row_base = bh.to(tl.int64) * M
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        rows = _query_rows(QIDX, stride_ib, stride_ir, b64, offs_m, m_mask, HAS_QIDX)
        q = _load_tile(q_base, rows, m_mask, strides_q[2], offs_d, strides_q[3], D)
        do = _load_tile(do_base, offs_m, m_mask, strides_do[2], offs_d, strides_do[3], D)
        lse = tl.load(LSE + row_base + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)
        # transposed scores: (BLOCK_N, BLOCK_M)
        qk_t = _dot(k, tl.trans(q), UPCAST, PRECISION) * qk_scale
        p_t = tl.exp2(qk_t - lse[None, :])
        p_t = tl.where(n_mask[:, None] & m_mask[None, :], p_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do, UPCAST, PRECISION)
        dp_t = _dot(v, tl.trans(do), UPCAST, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, UPCAST, PRECISION)
    dk = dk * sm_scale
    _store_tile(_bh_base(DK, strides_dk, b64, h64), offs_n, n_mask, strides_dk[2],
                offs_d, strides_dk[3], D, dk)
    _store_tile(_bh_base(DV, strides_dv, b64, h64), offs_n, n_mask, strides_dv[2],
                offs_d, strides_dv[3], D, dv)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, K, V, strides_k, strides_v, N,
                  qk_scale, offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dq accumulation over the N keys of one source (K, V: its (b, h) bases)."""
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        k = _load_tile(K, offs_n, n_mask, strides_k[2], offs_d, strides_k[3], D)
        v = _load_tile(V, offs_n, n_mask, strides_v[2], offs_d, strides_v[3], D)
        qk = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        p = tl.exp2(qk - lse[:, None])
        p = tl.where(n_mask[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST, PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, K2, V2, DO, LSE, DELTA, QIDX, DQ,
                   strides_q, strides_k, strides_v, strides_k2, strides_v2, strides_do, strides_dq,
                   stride_ib, stride_ir, H, M, N1, N2, sm_scale, qk_scale,
                   D: tl.constexpr, HAS_KV2: tl.constexpr, HAS_QIDX: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dQ for one block of (gathered) query rows, looping over the keys of both sources; the
    result is written to the gathered rows of dq (q_index rows are unique, so no races)."""
    bh, b64, h64, offs_m, offs_d, m_mask, rows, q = _query_block(
        Q, strides_q, QIDX, stride_ib, stride_ir, H, M, D, HAS_QIDX, BLOCK_M, BLOCK_D)
    do = _load_tile(_bh_base(DO, strides_do, b64, h64), offs_m, m_mask, strides_do[2],
                    offs_d, strides_do[3], D)
    row_base = bh.to(tl.int64) * M
    lse = tl.load(LSE + row_base + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, _bh_base(K, strides_k, b64, h64),
                       _bh_base(V, strides_v, b64, h64),
                       strides_k, strides_v, N1, qk_scale, offs_d, D,
                       BLOCK_N, UPCAST, PRECISION)
    if HAS_KV2:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, _bh_base(K2, strides_k2, b64, h64),
                           _bh_base(V2, strides_v2, b64, h64),
                           strides_k2, strides_v2, N2, qk_scale, offs_d, D,
                           BLOCK_N, UPCAST, PRECISION)
    dq = dq * sm_scale
    _store_tile(_bh_base(DQ, strides_dq, b64, h64), rows, m_mask, strides_dq[2], offs_d,
                strides_dq[3], D, dq)


# ----------------------------------------------------------------------------- head-mean probs
@triton.jit
def _head_mean_kernel(Q, K, LSE, QIDX, W,
                      strides_q, strides_k,
                      stride_wm, stride_ib, stride_ir,
                      H, M, N, col_offset, qk_scale, inv_h,
                      D: tl.constexpr, HAS_QIDX: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """W[b, m, col_offset + n] = mean_h softmax(...)[b, h, m, n] for one (m, n) tile of one key
    source, recomputed from the saved lse; the head loop accumulates in registers. W is the
    contiguous (B, M, N1 + N2) buffer `head_mean` allocates: strides (M*stride_wm, stride_wm, 1)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b64 = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = _query_rows(QIDX, stride_ib, stride_ir, b64, offs_m, m_mask, HAS_QIDX)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # per-head pointers advance by one head stride per iteration (no 32-bit overflow)
    q_ptrs, q_mask = _tile(Q + b64 * strides_q[0], rows, m_mask, strides_q[2], offs_d,
                           strides_q[3], D)
    k_ptrs, k_mask = _tile(K + b64 * strides_k[0], offs_n, n_mask, strides_k[2], offs_d,
                           strides_k[3], D)
    lse_ptrs = LSE + b64 * H * M + offs_m
    for _h in range(0, H):
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
        k = tl.load(k_ptrs, mask=k_mask, other=0.0)
        lse = tl.load(lse_ptrs, mask=m_mask, other=0.0)
        qk = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        acc += tl.exp2(qk - lse[:, None])
        q_ptrs += strides_q[1]
        k_ptrs += strides_k[1]
        lse_ptrs += M
    acc = acc * inv_h
    # W[b, offs_m, col_offset + offs_n]
    _store_tile(W + b64 * M * stride_wm + col_offset, offs_m, m_mask, stride_wm, offs_n, 1, N, acc)


# ----------------------------------------------------------------------------- launchers
def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _fwd_config(block_d: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward kernel."""
    if INTERPRETED:  # big blocks = fewer interpreted iterations (tiles change only rounding)
        return 64, 64, 4, 1
    if dtype == torch.float32:  # twice the shared memory per tile, no fp16 tensor-core rate
        return (64, 32, 4, 2) if block_d >= 128 else (64, 64, 4, 2)
    if block_d >= 128:
        return 128, 32, 8, 3
    return 128, 64, 4, 3


def _bwd_config(block_d: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the two backward kernels."""
    if INTERPRETED:
        return 64, 64, 4, 1
    # dK and dV accumulate in registers (2 x BLOCK_N x BLOCK_D fp32): 8 warps at d = 128
    if block_d >= 128:
        return 32, 64, 8, 2
    if dtype == torch.float32:
        return 32, 64, 4, 2
    return 64, 64, 4, 2


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision dot (tf32 would give ~1e-3 relative error). For fp16/bf16
    # inputs the setting does not apply; "ieee" is accepted by every target.
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRETED and dtype == torch.bfloat16


def _new(shape, dtype, device, like=None):
    t = torch.empty_like(like) if like is not None else torch.empty(shape, dtype=dtype,
                                                                     device=device)
    if POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t


def _device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device's current stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _qidx_args(q_index, placeholder):
    """QIDX, stride_ib, stride_ir; without q_index any pointer stands in (it is never read)."""
    if q_index is None:
        return placeholder, 0, 0
    return (q_index, *q_index.stride())


def _meta(q, q_index, cfg, **flags):
    """The compile-time arguments every attention kernel shares, plus `flags` (HAS_KV2), for
    cfg = (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    bm, bn, warps, stages = cfg
    return dict(D=q.shape[3], HAS_QIDX=q_index is not None, BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_D=_block_d(q.shape[3]), UPCAST=_upcast(q.dtype),
                PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages, **flags)


def _run(launch, cfg):
    """launch(cfg), cfg = (BLOCK_M, BLOCK_N, num_warps, num_stages). A GPU with less shared
    memory than the chosen tiles need (e.g. float32 at d = 128 on a 64 KiB part) gets smaller
    tiles instead of an error; other tiles change only the accumulation order (rounding). The
    tiles were chosen for sm_80 / sm_90 and checked to compile there; they have not been timed
    on a GPU yet."""
    while True:
        try:
            return launch(cfg)
        except OutOfResources:
            bm, bn, warps, stages = cfg
            if stages > 1:
                cfg = (bm, bn, warps, 1)
            elif bn > 16:
                cfg = (bm, bn // 2, warps, stages)
            elif bm > 16:
                cfg = (bm // 2, bn, warps, stages)
            else:
                raise


def _sources(k, v, k2, v2):
    """(k2, v2) to pass to a kernel (k, v stand in when absent: HAS_KV2 is then False) and the
    key counts N1, N2."""
    if k2 is None:
        return k, v, k.shape[2], 0
    return k2, v2, k.shape[2], k2.shape[2]


def forward(q, k, v, k2, v2, q_index, scale: float):
    """Returns (out, lse); out is (B, H, M, D) with (B, M, H, D) memory order (the layout
    `_fwd_kernel` writes without strides)."""
    B, H, _, D = q.shape
    M = q_index.shape[1] if q_index is not None else q.shape[2]
    out = _new((B, M, H, D), q.dtype, q.device).transpose(1, 2)
    lse = _new((B, H, M), torch.float32, q.device)
    k2_, v2_, N1, N2 = _sources(k, v, k2, v2)
    qidx = _qidx_args(q_index, lse)

    def launch(cfg):
        _fwd_kernel[(triton.cdiv(M, cfg[0]), B * H)](
            q, k, v, k2_, v2_, qidx[0], out, lse,
            q.stride(), k.stride(), v.stride(), k2_.stride(), v2_.stride(), *qidx[1:],
            H, M, N1, N2, float(scale) * LOG2E, **_meta(q, q_index, cfg, HAS_KV2=k2 is not None))

    _run(launch, _fwd_config(_block_d(D), q.dtype))
    return out, lse


def backward(do, q, k, v, k2, v2, out, lse, q_index, scale: float):
    """Returns (dq, dk, dv, dk2, dv2); dk2/dv2 are None without kv2."""
    B, H, _, D = q.shape
    M = out.shape[2]
    block_d = _block_d(D)
    cfg = _bwd_config(block_d, q.dtype)
    qk_scale = float(scale) * LOG2E
    qidx = _qidx_args(q_index, lse)

    # 1) delta = rowsum(dO * O)
    delta = _new(None, None, None, like=lse)
    _bwd_preprocess[(triton.cdiv(M, 64), B * H)](
        out, do, delta, out.stride(), do.stride(), H, M,
        D=D, BLOCK_M=64, BLOCK_D=block_d, num_warps=4)

    # 2) dK, dV: one program per key block and (batch, head), looping over the query rows
    grads = []
    for kk, vv in ((k, v), (k2, v2)):
        if kk is None:
            grads += [None, None]
            continue
        dk = _new(None, None, None, like=kk)
        dv = _new(None, None, None, like=vv)

        def launch_dkdv(c, kk=kk, vv=vv, dk=dk, dv=dv):
            n = kk.shape[2]
            _bwd_dkdv_kernel[(triton.cdiv(n, c[1]), B * H)](
                q, kk, vv, do, lse, delta, qidx[0], dk, dv,
                q.stride(), kk.stride(), vv.stride(), do.stride(), dk.stride(), dv.stride(),
                *qidx[1:], H, M, n, float(scale), qk_scale, **_meta(q, q_index, c))

        if kk.shape[2] > 0:
            _run(launch_dkdv, cfg)
        grads += [dk, dv]

    # 3) dQ: one program per query block, looping over the keys of both sources. GLCA: only
    # the gathered rows receive a gradient, every other row of dq is zero.
    dq = torch.zeros_like(q) if q_index is not None else _new(None, None, None, like=q)
    k2_, v2_, N1, N2 = _sources(k, v, k2, v2)

    def launch_dq(c):
        _bwd_dq_kernel[(triton.cdiv(M, c[0]), B * H)](
            q, k, v, k2_, v2_, do, lse, delta, qidx[0], dq,
            q.stride(), k.stride(), v.stride(), k2_.stride(), v2_.stride(), do.stride(),
            dq.stride(), *qidx[1:], H, M, N1, N2, float(scale), qk_scale,
            **_meta(q, q_index, c, HAS_KV2=k2 is not None))

    _run(launch_dq, cfg)
    return dq, grads[0], grads[1], grads[2], grads[3]


def head_mean(q, k, k2, lse, q_index, scale: float):
    """(B, M, N1 + N2) head-averaged attention probabilities, in q's dtype, contiguous (the
    layout `_head_mean_kernel` writes with one stride)."""
    B, H, _, D = q.shape
    M = lse.shape[2]
    N1, N2 = k.shape[2], k2.shape[2] if k2 is not None else 0
    w = _new((B, M, N1 + N2), q.dtype, q.device)
    bm0, bn0, warps0, _ = _bwd_config(_block_d(D), q.dtype)
    qidx = _qidx_args(q_index, lse)
    for kk, n, off in ((k, N1, 0), (k2, N2, N1)):
        if kk is None or n == 0:
            continue

        def launch(c, kk=kk, n=n, off=off):
            _head_mean_kernel[(triton.cdiv(M, c[0]), triton.cdiv(n, c[1]), B)](
                q, kk, lse, qidx[0], w, q.stride(), kk.stride(), w.stride(1), *qidx[1:],
                H, M, n, off, float(scale) * LOG2E, 1.0 / H, **_meta(q, q_index, c))

        _run(launch, (bm0, bn0, warps0, 1))
    return w


__all__ = ["forward", "backward", "head_mean", "INTERPRETED", "LOG2E"]
