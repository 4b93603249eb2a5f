"""memprof.tritonkernels: memory-lean attention kernels (flash-style, Triton) used by DCAL.

    from memprof.tritonkernels import attention
    out = attention(q, k, v)                                   # self-attention (SA)
    out = attention(q, k, v, kv2=(k2, v2))                     # PWCA: keys of two images
    out = attention(q, k, v, q_index=top_rows)                 # GLCA: selected query rows
    out, probs = attention(q, k, v, need_weights="head_mean")  # + (B, N, N) for rollout

See `memprof.tritonkernels._api.attention` for the full contract. Triton is imported only when a Triton kernel
runs (CUDA tensors, or CPU tensors with TRITON_INTERPRET=1).
"""
from ._api import (BACKENDS, MAX_HEAD_DIM, SUPPORTED_DTYPES, FlashAttentionFunction,
                   attention, concat_kv_gather_q, reference_attention)

__all__ = ["attention", "reference_attention", "concat_kv_gather_q", "FlashAttentionFunction",
           "SUPPORTED_DTYPES", "MAX_HEAD_DIM", "BACKENDS"]
