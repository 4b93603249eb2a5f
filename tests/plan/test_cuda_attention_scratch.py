"""Attention backward scratch and grouped-query heads, by hand from PyTorch's CUDA kernels
(attention_backward.cu, mem_eff_attention/kernel_backward.h and kernels/generate_kernels.py,
flash_api.cpp mha_bwd, sdp_utils.cpp): the rules of memprof.plan.cuda_kernels."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from memprof.plan.cuda_kernels import (FLASH, MATH, CudaKernels,
                                       efficient_backward_scratch, flash_backward_scratch,
                                       sdpa_backend, target_for)
from memprof.plan.estimate import estimate_step
from memprof.plan.gpus import lookup

V100, A100 = (target_for(lookup(n)) for n in ("v100-16gb", "a100-40gb"))
MI300X = target_for(lookup("mi300x"))
F16, F32 = torch.float16, torch.float32


def test_efficient_backward_scratch_by_hand():
    b, h, s = 2, 4, 128
    bhs = b * h * s
    # A100 fp16, D 64: kernel k64, block 64 x 64, dK/dV in registers; delta B x H x S fp32 +
    # the dQ accumulator: ceil(128/64) x ceil(64/64) tiles of (64 x 64 floats + 4 int32)
    assert efficient_backward_scratch(A100, (b, h, s, 64), (b, h, s, 64), 64, F16) == \
        4 * bhs + 4 * b * h * (2 * 1 * (64 * 64 + 4))
    # A100 fp16, D 256: kernel k65536, block 128 x 64, dK/dV accumulated in fp32 with 2 key
    # splits (ceil(128/64), B*H = 8 < 256, <= 200 // 8): 2 x 128 x 256 floats each
    gq = 1 * 4 * (128 * 64 + 4)
    gkv = 2 * (2 * 128 * 256)
    assert efficient_backward_scratch(A100, (b, h, s, 256), (b, h, s, 256), 256, F16) == \
        4 * bhs + 4 * b * h * (gq + gkv)
    # V100 fp16, D 128: block 64 (less shared memory), dK/dV not in registers and sm70: delta
    # is the composite (grad_out.float() * out.float()).sum(-1): two casts and the product
    # (B x S x H x 128 fp32 each), the sum and its contiguous copy (B x H x S fp32 each)
    gq = 2 * 2 * (64 * 64 + 4)
    gkv = 2 * (2 * 128 * 128)
    assert efficient_backward_scratch(V100, (b, h, s, 128), (b, h, s, 128), 128, F16) == \
        3 * 4 * bhs * 128 + 2 * 4 * bhs + 4 * b * h * (gq + gkv)
    # fp32: no accumulators for dK/dV (accumulator type = output type), no casts in delta
    assert efficient_backward_scratch(A100, (b, h, s, 64), (b, h, s, 64), 64, F32) == \
        4 * bhs * 64 + 2 * 4 * bhs + 4 * b * h * (2 * 1 * (64 * 64 + 4))
    # ROCm (AOTriton): delta unless the fused backward runs (D <= 192 and D x S < 64 x 512)
    assert efficient_backward_scratch(MI300X, (b, h, s, 64), (b, h, s, 64), 64, F16) == 0
    assert efficient_backward_scratch(MI300X, (b, h, 1024, 64), (b, h, 1024, 64), 64, F16) \
        == 4 * b * h * 1024


def test_flash_gqa_backward_expands_dk_dv():
    # 8 query heads over 2 key/value heads: dk_expanded + dv_expanded, B x S_k x 8 x D, bf16
    base = flash_backward_scratch((2, 8, 128, 64), 64)
    assert flash_backward_scratch((2, 8, 128, 64), 64, (2, 2, 128, 64), 2) == \
        base + 2 * 2 * 128 * 8 * 64 * 2
    assert flash_backward_scratch((2, 8, 128, 64), 64, (2, 8, 128, 64), 2) == base


class GQAAttention(nn.Module):
    """8 query heads, 2 key/value heads, `enable_gqa` as Hugging Face's sdpa path passes it."""

    def __init__(self, heads=8, kv_heads=2, d=64):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, d
        self.q = nn.Linear(heads * d, heads * d)
        self.kv_proj = nn.Linear(heads * d, 2 * kv_heads * d)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.d).transpose(1, 2)
        k, v = self.kv_proj(x).view(b, s, 2, self.kv, self.d).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return o.transpose(1, 2).reshape(b, s, self.h * self.d)


def _gqa_batch(b):
    return (torch.randn(b, 128, 512),), torch.randn(b, 128, 512)


def test_gqa_runs_flash_unexpanded_and_efficient_refuses_it():
    with FakeTensorMode():
        q = torch.empty(2, 8, 128, 64, dtype=torch.bfloat16)
        k = v = torch.empty(2, 2, 128, 64, dtype=torch.bfloat16)
        assert sdpa_backend(A100, q, k, v, None, 0.0, True, True, True) == FLASH
        # efficient admits no grouped heads (sdp_utils: ..._num_heads_dense<false>): math
        assert sdpa_backend(V100, q.half(), k.half(), v.half(), None, 0.0, True, True,
                            True) == MATH
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        with CudaKernels(A100) as kernels:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert kernels.applied == {"sdpa: flash": 1}
        saved = {n: getattr(out.grad_fn, n) for n in dir(out.grad_fn) if n.startswith("_saved_")}
        assert saved["_saved_key"].shape == (2, 2, 128, 64)        # not repeated to 8 heads
    # in a whole estimate: the backward's dk/dv_expanded scratch is in the stream
    est = estimate_step(GQAAttention(), _gqa_batch, F.mse_loss, batch_size=2,
                        precision="bf16", gpu="a100-40gb")
    expected = flash_backward_scratch((2, 8, 128, 64), 64, (2, 2, 128, 64), 2)
    sizes = est.profile.effective_size
    assert (sizes == expected).sum() == 1 and (sizes == -expected).sum() == 1
    assert est.kernel_rules == {"sdpa: flash": 1}


def test_efficient_backward_scratch_is_in_the_estimated_stream():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(256, 768)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, 4, 64).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 256)

    def batch(b):
        return (torch.randn(b, 128, 256),), torch.randn(b, 128, 256)

    est = estimate_step(Attn(), batch, F.mse_loss, batch_size=3, precision="fp32",
                        gpu="a100-40gb")
    assert est.kernel_rules == {"sdpa: efficient": 1}                # fp32: not flash
    expected = efficient_backward_scratch(A100, (3, 4, 128, 64), (3, 4, 128, 64), 64, F32)
    sizes = est.profile.effective_size
    assert (sizes == expected).sum() == 1 and (sizes == -expected).sum() == 1
