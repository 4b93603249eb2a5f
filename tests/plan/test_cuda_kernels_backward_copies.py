"""The `.contiguous()` copies of grad_out and out that CUDA attention backward makes
(attention_backward.cu: `_scaled_dot_product_flash_attention_backward_cuda` hands the (B, S, H, D)
transposes to `_flash_attention_backward`, which copies both unless contiguous; the efficient
path copies grad_out), by hand from the tensors' layouts."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from memprof.plan.cuda_kernels import (KernelScratch, KernelTarget, contiguous_copy_bytes,
                                       efficient_backward_scratch, flash_backward_scratch)
from memprof.plan.estimate import estimate_step

A100 = KernelTarget("a100", (8, 0))
FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_backward.default
EFFICIENT_BWD = torch.ops.aten._scaled_dot_product_efficient_attention_backward.default


def test_copy_bytes_follow_the_layout():
    b, h, s, d = 2, 4, 96, 64
    with FakeTensorMode():
        bshd = torch.empty(b, s, h, d, dtype=torch.bfloat16).transpose(1, 2)  # heads in the row
        bhsd = torch.empty(b, h, s, d, dtype=torch.bfloat16)                  # contiguous B,H,S,D
        assert contiguous_copy_bytes(bshd) == 0
        assert contiguous_copy_bytes(bhsd) == b * h * s * d * 2
        assert contiguous_copy_bytes(bhsd.float()) == b * h * s * d * 4


def test_flash_backward_scratch_adds_the_copies_of_grad_out_and_out():
    b, h, s, d = 2, 4, 96, 64
    base = flash_backward_scratch((b, h, s, d), d, (b, h, s, d), 2)
    copy = b * h * s * d * 2
    scratch = KernelScratch(A100)
    with FakeTensorMode():
        bshd = [torch.empty(b, s, h, d, dtype=torch.bfloat16).transpose(1, 2)
                for _ in range(5)]
        bhsd = torch.empty(b, h, s, d, dtype=torch.bfloat16)
        lse = torch.empty(b, h, s)

        def args(grad_out, out):
            return (grad_out, bshd[1], bshd[2], bshd[3], out, lse)
        assert scratch.scratch(FLASH_BWD, args(bshd[0], bshd[4])) == base
        assert scratch.scratch(FLASH_BWD, args(bshd[0], bhsd)) == base + copy
        assert scratch.scratch(FLASH_BWD, args(bhsd, bhsd)) == base + 2 * copy
        # efficient: only grad_out is copied (out is read through its strides)
        eff = efficient_backward_scratch(A100, (b, h, s, d), (b, h, s, d), d, torch.bfloat16)
        eargs = (bshd[0], bshd[1], bshd[2], bshd[3], None, bhsd, lse)
        assert scratch.scratch(EFFICIENT_BWD, eargs) == eff
        assert scratch.scratch(EFFICIENT_BWD, (bhsd,) + eargs[1:]) == eff + copy


class RotaryStyleAttention(nn.Module):
    """q and k rebuilt by torch.cat (as rotary embeddings do): contiguous as (B, H, S, D), so
    the flash output is too, and its backward copies `out`."""

    def __init__(self, h=4, d=64):
        super().__init__()
        self.h, self.d = h, d
        self.qkv = nn.Linear(h * d, 3 * h * d, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        q = torch.cat((q[..., :32] * 2, q[..., 32:]), dim=-1)
        k = torch.cat((k[..., :32] * 2, k[..., 32:]), dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o.transpose(1, 2).reshape(b, s, self.h * self.d)


def test_estimate_records_the_out_copy_of_flash_backward():
    def batch(b):
        return (torch.randn(b, 128, 256),), torch.randn(b, 128, 256)

    est = estimate_step(RotaryStyleAttention(), batch, F.mse_loss, batch_size=2,
                        precision="bf16", gpu="a100-40gb")
    assert est.kernel_rules == {"sdpa: flash": 1}
    # grad_out arrives as (B, S, H, D) memory (from the reshape): no copy; out: one
    expected = flash_backward_scratch((2, 4, 128, 64), 64, (2, 4, 128, 64), 2) \
        + 2 * 4 * 128 * 64 * 2
    sizes = est.profile.effective_size
    assert (sizes == expected).sum() == 1 and (sizes == -expected).sum() == 1
