"""memprof.tritonkernels: memory-lean attention kernels (flash-style, Triton) used by DCAL.

    from memprof.tritonkernels import attention
    out = attention(q, k, v)                                   # self-attention (SA)
    out = attention(q, k, v, kv2=(k2, v2))                     # PWCA: keys of two images
    out = attention(q, k, v, q_index=top_rows)                 # GLCA: selected query rows
    out, probs = attention(q, k, v, need_weights="head_mean")  # + (B, N, N) for rollout

See `memprof.tritonkernels._api.attention` for the full contract. The Triton path is the custom
op `torch.ops.tritonkernels.flash_attention` (`FORWARD_OP`; backward `BACKWARD_OP`, see `_op.py`
for what its fake implementation models; `kernel_scratch_bytes` gives the GPU scratch that is no
output). Triton is imported only when a Triton kernel runs (CUDA tensors, or CPU tensors with
TRITON_INTERPRET=1).
"""
from ._api import (BACKENDS, MAX_HEAD_DIM, SUPPORTED_DTYPES, attention, concat_kv_gather_q,
                   reference_attention)
from ._op import BACKWARD_OP, FORWARD_OP, kernel_scratch_bytes

__all__ = ["attention", "reference_attention", "concat_kv_gather_q", "FORWARD_OP", "BACKWARD_OP",
           "kernel_scratch_bytes", "SUPPORTED_DTYPES", "MAX_HEAD_DIM", "BACKENDS"]
