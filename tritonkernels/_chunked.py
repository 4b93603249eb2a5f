"""The attention kernels' algorithm in plain PyTorch ops, shared by the torch backend
(`_api.ChunkedAttentionFunction`) and the CPU implementation of the `tritonkernels::` custom ops
(`_op.py`): softmax over both key sources, one chunk of query rows at a time, so nothing
N x N outlives a chunk and k is never concatenated with k2. fp16 / bf16 inputs are computed in
float32. Also the differentiable vjp used for double backward, and the PWCA / GLCA helpers.
"""
from __future__ import annotations

import torch

__all__ = ["gather_rows", "concat_kv_gather_q", "chunk_rows", "chunked_forward",
           "chunked_backward", "attention_vjp", "cast_like"]


def gather_rows(q: torch.Tensor, q_index: torch.Tensor) -> torch.Tensor:
    """q (B, H, N, d), q_index (B, R) -> the selected rows (B, H, R, d)."""
    B, H, _, d = q.shape
    idx = q_index.to(torch.int64)[:, None, :, None].expand(B, H, q_index.shape[1], d)
    return torch.gather(q, 2, idx)


def scatter_rows(dqs: torch.Tensor, q: torch.Tensor, q_index: torch.Tensor) -> torch.Tensor:
    """The gradient of `gather_rows`: dqs (B, H, R, d) placed at the rows q_index of a tensor
    like q (`zeros_like`: q's strides, as the Triton backward allocates dq), zero elsewhere
    (rows are unique, so nothing is summed)."""
    idx = q_index.to(torch.int64)[:, None, :, None].expand(dqs.shape)
    return torch.zeros_like(q, dtype=dqs.dtype).scatter_(2, idx, dqs)


def concat_kv_gather_q(q, k, v, kv2=None, q_index=None):
    """What plain attention code does for PWCA and GLCA: concatenate the second source's
    keys/values (B, H, Nk + Nk2, d) and gather the selected query rows (B, H, R, d)."""
    if kv2 is not None:
        k = torch.cat([k, kv2[0]], dim=2)
        v = torch.cat([v, kv2[1]], dim=2)
    if q_index is not None:
        q = gather_rows(q, q_index)
    return q, k, v


def chunk_rows(H: int, M: int, n_keys: int) -> int:
    """Query rows per chunk: about 4 MiB of float32 scores per batch element. Independent of the
    batch size, so steps at two batch sizes run the same ops (memprof's estimates interpolate
    between them op by op)."""
    return max(16, min(M, (1 << 20) // max(1, H * n_keys)))


def _scores(qc, k, k2, scale):
    """float32 scores of a chunk of (already float32) query rows against both key sources."""
    s = torch.matmul(qc, k.transpose(-1, -2)).mul_(scale)
    if k2 is None:
        return s
    return torch.cat([s, torch.matmul(qc, k2.transpose(-1, -2)).mul_(scale)], dim=-1)


def _f32(t):
    return None if t is None else t.float()


def cast_like(grads, inputs):
    """Each gradient in its input's dtype (None stays None)."""
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs))


def chunked_forward(qs, k, v, k2, v2, scale: float, want_weights: bool, rows: int):
    """(out, lse, weights or None) for the query rows qs (already gathered), `rows` query rows
    per chunk. out (B, H, M, d) in qs's dtype with (B, M, H, d) memory, as the Triton kernel
    writes it; lse (B, H, M) float32, natural log; weights (B, M, N1 + N2) head-mean."""
    B, H, M, d = qs.shape
    n1 = k.shape[2]
    kf, vf, k2f, v2f = _f32(k), _f32(v), _f32(k2), _f32(v2)
    n_keys = n1 + (k2.shape[2] if k2 is not None else 0)
    out = torch.empty((B, M, H, d), dtype=qs.dtype, device=qs.device).transpose(1, 2)
    lse = torch.empty((B, H, M), dtype=torch.float32, device=qs.device)
    weights = (torch.empty((B, M, n_keys), dtype=qs.dtype, device=qs.device)
               if want_weights else None)
    for r0 in range(0, M, rows):
        sl = slice(r0, min(M, r0 + rows))
        s = _scores(qs[:, :, sl].float(), kf, k2f, scale)
        lse_c = torch.logsumexp(s, dim=-1)
        p = s.sub_(lse_c[..., None]).exp_()
        o = torch.matmul(p[..., :n1], vf)
        if k2 is not None:
            o.add_(torch.matmul(p[..., n1:], v2f))
        out[:, :, sl] = o
        lse[:, :, sl] = lse_c
        if weights is not None:
            weights[:, sl] = p.mean(dim=1)
    return out, lse, weights


def chunked_backward(dout, qs, k, v, k2, v2, out, lse, scale: float, rows: int):
    """(dqs, dk, dv, dk2, dv2) in their inputs' dtypes (dk2, dv2 None for one source), from the
    saved out and natural-log lse of `chunked_forward`."""
    B, H, M, d = qs.shape
    n1 = k.shape[2]
    kf, vf, k2f, v2f = _f32(k), _f32(v), _f32(k2), _f32(v2)
    dq = torch.empty_like(qs)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    dk2, dv2 = (torch.zeros_like(k2f), torch.zeros_like(v2f)) if k2 is not None else (
        None, None)
    for r0 in range(0, M, rows):
        sl = slice(r0, min(M, r0 + rows))
        qc = qs[:, :, sl].float()
        doc = dout[:, :, sl].float()
        delta = (doc * out[:, :, sl].float()).sum(dim=-1, keepdim=True)
        p = _scores(qc, kf, k2f, scale).sub_(lse[:, :, sl, None]).exp_()
        dp = torch.matmul(doc, vf.transpose(-1, -2))
        if k2 is not None:
            dp = torch.cat([dp, torch.matmul(doc, v2f.transpose(-1, -2))], dim=-1)
        ds = dp.sub_(delta).mul_(p)
        dv.add_(torch.matmul(p[..., :n1].transpose(-1, -2), doc))
        dk.add_(torch.matmul(ds[..., :n1].transpose(-1, -2), qc), alpha=scale)
        dqc = torch.matmul(ds[..., :n1], kf)
        if k2 is not None:
            dv2.add_(torch.matmul(p[..., n1:].transpose(-1, -2), doc))
            dk2.add_(torch.matmul(ds[..., n1:].transpose(-1, -2), qc), alpha=scale)
            dqc.add_(torch.matmul(ds[..., n1:], k2f))
        dq[:, :, sl] = dqc.mul_(scale)
    return cast_like((dq, dk, dv, dk2, dv2), (qs, k, v, k2, v2))


def attention_vjp(dout, q, k, v, k2, v2, q_index, scale):
    """(dq, dk, dv, dk2, dv2) for the upstream gradient dout, in differentiable PyTorch ops
    (float32 math, autocast off): every backward under create_graph=True, so that autograd
    can differentiate the gradients again (double backward, gradient penalties). It
    materialises the B x H x M x (N1 + N2) probabilities, as math attention does."""
    with torch.autocast(q.device.type, enabled=False):
        kv2 = None if k2 is None else (k2.float(), v2.float())
        qs, keys, vals = concat_kv_gather_q(q.float(), k.float(), v.float(), kv2, q_index)
        do = dout.float()
        p = torch.softmax(torch.matmul(qs, keys.transpose(-1, -2)) * scale, dim=-1)
        dp = torch.matmul(do, vals.transpose(-1, -2))
        ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
        dq = torch.matmul(ds, keys) * scale
        dkeys = torch.matmul(ds.transpose(-1, -2), qs) * scale
        dvals = torch.matmul(p.transpose(-1, -2), do)
    if q_index is not None:  # the gathered rows get their gradients, every other row zero
        dq = scatter_rows(dq, q, q_index)
    n1 = k.shape[2]
    grads = (dq, dkeys[:, :, :n1], dvals[:, :, :n1]) + (
        (None, None) if k2 is None else (dkeys[:, :, n1:], dvals[:, :, n1:]))
    return cast_like(grads, (q, k, v, k2, v2))
