"""Triton kernels for flash-style attention (forward, backward, head-mean probabilities).

Imported lazily by `_api.py`, only when the Triton backend is used: whether the kernels
are compiled (CUDA) or run by Triton's interpreter (CPU tensors, ``TRITON_INTERPRET=1``) is
decided by Triton when this module is imported, so `INTERPRETED` records which it was.

Layout conventions (all tensors may have arbitrary strides; nothing is made contiguous):
  q         (B, H, Nq, D)      queries
  k, v      (B, H, N1, D)      keys/values, source 1
  k2, v2    (B, H, N2, D)      keys/values, source 2 (PWCA), optional
  q_index   (B, R)             rows of q that attend (GLCA), optional; M = R, else M = Nq
  out       (B, H, M, D)       allocated as (B, M, H, D) memory, returned as a permuted view
  lse       (B, H, M) float32  log2-sum-exp of the scaled scores (log2 domain, see below)

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
def _query_rows(QIDX, stride_ib, stride_ir, b, offs_m, m_mask, HAS_QIDX: tl.constexpr):
    """Row numbers of q for the compact rows offs_m (gathered through q_index for GLCA)."""
    if HAS_QIDX:
        rows = tl.load(QIDX + b.to(tl.int64) * stride_ib + offs_m * stride_ir, mask=m_mask, other=0)
    else:
        rows = offs_m.to(tl.int64)
    return rows


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, N, qk_scale,
               offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    """Online-softmax accumulation over the N keys of one source."""
    d_mask = offs_d < D
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask,
                    other=0.0)
        qk = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        # every block holds at least one valid key (start_n < N), so m_new is finite
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask,
                    other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, K2, V2, QIDX, O, LSE,
                stride_qb, stride_qh, stride_qn, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_k2b, stride_k2h, stride_k2n, stride_k2d,
                stride_v2b, stride_v2h, stride_v2n, stride_v2d,
                stride_ob, stride_oh, stride_on, stride_od,
                stride_ib, stride_ir,
                H, M, N1, N2, qk_scale,
                D: tl.constexpr, HAS_KV2: tl.constexpr, HAS_QIDX: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    d_mask = offs_d < D
    rows = _query_rows(QIDX, stride_ib, stride_ir, b, offs_m, m_mask, HAS_QIDX)

    q_base = Q + b64 * stride_qb + h64 * stride_qh
    q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q,
                               K + b64 * stride_kb + h64 * stride_kh,
                               V + b64 * stride_vb + h64 * stride_vh,
                               stride_kn, stride_kd, stride_vn, stride_vd, N1, qk_scale,
                               offs_d, D, BLOCK_N, UPCAST, PRECISION)
    if HAS_KV2:
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q,
                                   K2 + b64 * stride_k2b + h64 * stride_k2h,
                                   V2 + b64 * stride_v2b + h64 * stride_v2h,
                                   stride_k2n, stride_k2d, stride_v2n, stride_v2d, N2, qk_scale,
                                   offs_d, D, BLOCK_N, UPCAST, PRECISION)
    acc = acc / l_i[:, None]
    lse = m_i + tl.log2(l_i)

    o_ptrs = (O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_on
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + bh.to(tl.int64) * M + offs_m, lse, mask=m_mask)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _bwd_preprocess(O, DO, DELTA,
                    stride_ob, stride_oh, stride_on, stride_od,
                    stride_dob, stride_doh, stride_don, stride_dod,
                    H, M, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, m] = sum_d dO * O (float32)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < M)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_on
                + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * M + offs_m, tl.sum(o * do, 1), mask=offs_m < M)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, QIDX, DK, DV,
                     stride_qb, stride_qh, stride_qn, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_dob, stride_doh, stride_don, stride_dod,
                     stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                     stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                     stride_ib, stride_ir,
                     H, M, N, sm_scale, qk_scale,
                     D: tl.constexpr, HAS_QIDX: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV for one block of keys of one source, looping over all (gathered) query rows.
    Launched once per key source; the softmax normaliser (lse) already spans both sources."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    b64 = b.to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    d_mask = offs_d < D
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + b64 * stride_kb + h64 * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + h64 * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    q_base = Q + b64 * stride_qb + h64 * stride_qh
    do_base = DO + b64 * stride_dob + h64 * stride_doh
    row_base = bh.to(tl.int64) * M
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        md_mask = m_mask[:, None] & d_mask[None, :]
        rows = _query_rows(QIDX, stride_ib, stride_ir, b, offs_m, m_mask, HAS_QIDX)
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=md_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                     mask=md_mask, other=0.0)
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
    tl.store(DK + b64 * stride_dkb + h64 * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * stride_dvb + h64 * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, N,
                  qk_scale, offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    d_mask = offs_d < D
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask,
                    other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask,
                    other=0.0)
        qk = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        p = tl.exp2(qk - lse[:, None])
        p = tl.where(n_mask[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST, PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, K2, V2, DO, LSE, DELTA, QIDX, DQ,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_k2b, stride_k2h, stride_k2n, stride_k2d,
                   stride_v2b, stride_v2h, stride_v2n, stride_v2d,
                   stride_dob, stride_doh, stride_don, stride_dod,
                   stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                   stride_ib, stride_ir,
                   H, M, N1, N2, sm_scale, qk_scale,
                   D: tl.constexpr, HAS_KV2: tl.constexpr, HAS_QIDX: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dQ for one block of (gathered) query rows, looping over the keys of both sources; the
    result is written to the gathered rows of dq (q_index rows are unique, so no races)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    b64 = b.to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    md_mask = m_mask[:, None] & (offs_d < D)[None, :]
    rows = _query_rows(QIDX, stride_ib, stride_ir, b, offs_m, m_mask, HAS_QIDX)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + rows[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=md_mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :] * stride_dod, mask=md_mask, other=0.0)
    row_base = bh.to(tl.int64) * M
    lse = tl.load(LSE + row_base + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta,
                       K + b64 * stride_kb + h64 * stride_kh, V + b64 * stride_vb + h64 * stride_vh,
                       stride_kn, stride_kd, stride_vn, stride_vd, N1, qk_scale, offs_d, D,
                       BLOCK_N, UPCAST, PRECISION)
    if HAS_KV2:
        dq = _bwd_dq_inner(dq, q, do, lse, delta,
                           K2 + b64 * stride_k2b + h64 * stride_k2h,
                           V2 + b64 * stride_v2b + h64 * stride_v2h,
                           stride_k2n, stride_k2d, stride_v2n, stride_v2d, N2, qk_scale, offs_d, D,
                           BLOCK_N, UPCAST, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + rows[:, None] * stride_dqn
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=md_mask)


# ----------------------------------------------------------------------------- head-mean probs
@triton.jit
def _head_mean_kernel(Q, K, LSE, QIDX, W,
                      stride_qb, stride_qh, stride_qn, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_wb, stride_wm, stride_wn,
                      stride_ib, stride_ir,
                      H, M, N, col_offset, qk_scale, inv_h,
                      D: tl.constexpr, HAS_QIDX: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """W[b, m, col_offset + n] = mean_h softmax(...)[b, h, m, n] for one (m, n) tile of one key
    source, recomputed from the saved lse; the head loop accumulates in registers."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    n_mask = offs_n < N
    d_mask = offs_d < D
    rows = _query_rows(QIDX, stride_ib, stride_ir, b, offs_m, m_mask, HAS_QIDX)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # per-head pointers advance by one head stride per iteration (no 32-bit overflow)
    q_ptrs = (Q + b64 * stride_qb + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd)
    k_ptrs = (K + b64 * stride_kb + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd)
    lse_ptrs = LSE + b64 * H * M + offs_m
    for _h in range(0, H):
        q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        k = tl.load(k_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        lse = tl.load(lse_ptrs, mask=m_mask, other=0.0)
        qk = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        acc += tl.exp2(qk - lse[:, None])
        q_ptrs += stride_qh
        k_ptrs += stride_kh
        lse_ptrs += M
    acc = acc * inv_h
    tl.store(W + b64 * stride_wb + offs_m[:, None] * stride_wm
             + (col_offset + offs_n)[None, :] * stride_wn, acc.to(W.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


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


def _qidx_args(q_index):
    if q_index is None:
        return None, 0, 0
    return q_index, q_index.stride(0), q_index.stride(1)


def _run(launch, cfg):
    """launch(BLOCK_M, BLOCK_N, num_warps, num_stages). A GPU with less shared memory than the
    chosen tiles need (e.g. float32 at d = 128 on a 64 KiB part) gets smaller tiles instead of an
    error; other tiles change only the accumulation order (rounding). The tiles were chosen for
    sm_80 / sm_90 and checked to compile there; they have not been timed on a GPU yet."""
    while True:
        try:
            return launch(*cfg)
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


def forward(q, k, v, k2, v2, q_index, scale: float):
    """Returns (out, lse); out is (B, H, M, D) with (B, M, H, D) memory order."""
    B, H, _, D = q.shape
    N1 = k.shape[2]
    N2 = k2.shape[2] if k2 is not None else 0
    M = q_index.shape[1] if q_index is not None else q.shape[2]
    out = _new((B, M, H, D), q.dtype, q.device).transpose(1, 2)
    lse = _new((B, H, M), torch.float32, q.device)
    block_d = _block_d(D)
    k2_, v2_ = (k2, v2) if k2 is not None else (k, v)
    qi, sib, sir = _qidx_args(q_index)

    def launch(bm, bn, warps, stages):
        _fwd_kernel[(triton.cdiv(M, bm), B * H)](
            q, k, v, k2_, v2_, qi if qi is not None else lse, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *k2_.stride(), *v2_.stride(), *out.stride(),
            sib, sir, H, M, N1, N2, float(scale) * LOG2E,
            D=D, HAS_KV2=k2 is not None, HAS_QIDX=q_index is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
            UPCAST=_upcast(q.dtype), PRECISION=_precision(q.dtype),
            num_warps=warps, num_stages=stages)

    _run(launch, _fwd_config(block_d, q.dtype))
    return out, lse


def backward(do, q, k, v, k2, v2, out, lse, q_index, scale: float):
    """Returns (dq, dk, dv, dk2, dv2); dk2/dv2 are None without kv2."""
    B, H, _, D = q.shape
    N1 = k.shape[2]
    N2 = k2.shape[2] if k2 is not None else 0
    M = out.shape[2]
    block_d = _block_d(D)
    cfg = _bwd_config(block_d, q.dtype)
    upcast, prec = _upcast(q.dtype), _precision(q.dtype)
    qk_scale = float(scale) * LOG2E
    qi, sib, sir = _qidx_args(q_index)
    qi_arg = qi if qi is not None else lse

    # 1) delta = rowsum(dO * O)
    delta = _new(None, None, None, like=lse)
    _bwd_preprocess[(triton.cdiv(M, 64), B * H)](
        out, do, delta, *out.stride(), *do.stride(), H, M,
        D=D, BLOCK_M=64, BLOCK_D=block_d, num_warps=4)

    # 2) dK, dV: one program per key block and (batch, head), looping over the query rows
    grads = []
    for kk, vv, n in ((k, v, N1), (k2, v2, N2)):
        if kk is None:
            grads += [None, None]
            continue
        dk = _new(None, None, None, like=kk)
        dv = _new(None, None, None, like=vv)

        def launch_dkdv(bm, bn, warps, stages, kk=kk, vv=vv, dk=dk, dv=dv, n=n):
            _bwd_dkdv_kernel[(triton.cdiv(n, bn), B * H)](
                q, kk, vv, do, lse, delta, qi_arg, dk, dv,
                *q.stride(), *kk.stride(), *vv.stride(), *do.stride(), *dk.stride(),
                *dv.stride(), sib, sir, H, M, n, float(scale), qk_scale,
                D=D, HAS_QIDX=q_index is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
                UPCAST=upcast, PRECISION=prec, num_warps=warps, num_stages=stages)

        if n > 0:
            _run(launch_dkdv, cfg)
        grads += [dk, dv]

    # 3) dQ: one program per query block, looping over the keys of both sources. GLCA: only
    # the gathered rows receive a gradient, every other row of dq is zero.
    dq = torch.zeros_like(q) if q_index is not None else _new(None, None, None, like=q)
    k2_, v2_ = (k2, v2) if k2 is not None else (k, v)

    def launch_dq(bm, bn, warps, stages):
        _bwd_dq_kernel[(triton.cdiv(M, bm), B * H)](
            q, k, v, k2_, v2_, do, lse, delta, qi_arg, dq,
            *q.stride(), *k.stride(), *v.stride(), *k2_.stride(), *v2_.stride(), *do.stride(),
            *dq.stride(), sib, sir, H, M, N1, N2, float(scale), qk_scale,
            D=D, HAS_KV2=k2 is not None, HAS_QIDX=q_index is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
            UPCAST=upcast, PRECISION=prec, num_warps=warps, num_stages=stages)

    _run(launch_dq, cfg)
    return dq, grads[0], grads[1], grads[2], grads[3]


def head_mean(q, k, k2, lse, q_index, scale: float):
    """(B, M, N1 + N2) head-averaged attention probabilities, in q's dtype."""
    B, H, _, D = q.shape
    M = lse.shape[2]
    N1 = k.shape[2]
    N2 = k2.shape[2] if k2 is not None else 0
    w = _new((B, M, N1 + N2), q.dtype, q.device)
    block_d = _block_d(D)
    bm0, bn0, warps0, _ = _bwd_config(block_d, q.dtype)
    qi, sib, sir = _qidx_args(q_index)
    for kk, n, off in ((k, N1, 0), (k2, N2, N1)):
        if kk is None or n == 0:
            continue

        def launch(bm, bn, warps, stages, kk=kk, n=n, off=off):
            _head_mean_kernel[(triton.cdiv(M, bm), triton.cdiv(n, bn), B)](
                q, kk, lse, qi if qi is not None else lse, w,
                *q.stride(), *kk.stride(), *w.stride(), sib, sir,
                H, M, n, off, float(scale) * LOG2E, 1.0 / H,
                D=D, HAS_QIDX=q_index is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
                UPCAST=_upcast(q.dtype), PRECISION=_precision(q.dtype), num_warps=warps,
                num_stages=stages)

        _run(launch, (bm0, bn0, warps0, 1))
    return w


__all__ = ["forward", "backward", "head_mean", "INTERPRETED", "LOG2E"]
