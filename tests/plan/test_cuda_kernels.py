"""Each CUDA kernel rule against numbers computed by hand from PyTorch's kernel signatures."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from memprof.plan.cuda_kernels import (EFFICIENT, FLASH, MATH, CudaKernels, KernelScratch,
                                       KernelTarget, cublas_workspace_bytes,
                                       flash_backward_scratch, sdpa_backend, target_for)
from memprof.plan.estimate import estimate_step
from memprof.plan.gpus import lookup

V100, A100, RTX4090, H100 = (target_for(lookup(n)) for n in
                             ("v100-16gb", "a100-40gb", "rtx-4090", "h100-80gb"))
MI300X = target_for(lookup("mi300x"))
B, H, S, D = 2, 4, 128, 64


def qkv(dtype=torch.float16, d=D, s=S, grad=True):
    return [torch.empty(B, H, s, d, dtype=dtype, requires_grad=grad) for _ in range(3)]


def saved(node):
    return {n[len("_saved_"):]: getattr(node, n) for n in dir(node) if n.startswith("_saved_")}


def nbytes(t):
    return t.untyped_storage().nbytes()


@pytest.mark.parametrize("target, dtype, mask, dropout, d, expected", [
    (A100, torch.float16, False, 0.0, 64, FLASH),
    (A100, torch.bfloat16, False, 0.1, 128, FLASH),      # flash supports dropout
    (A100, torch.float16, True, 0.0, 64, EFFICIENT),     # an attn_mask rules flash out
    (A100, torch.float32, False, 0.1, 64, EFFICIENT),    # flash is fp16/bf16 only
    (A100, torch.float16, False, 0.0, 288, EFFICIENT),   # flash: head dim <= 256
    (V100, torch.float16, False, 0.1, 64, EFFICIENT),    # flash needs sm80
    (V100, torch.bfloat16, False, 0.0, 64, MATH),        # no bf16 before sm80
    (V100, torch.float16, False, 0.0, 60, MATH),         # 16-bit: head dim % 8
    (A100, torch.float32, False, 0.0, 62, MATH),         # fp32 on sm80: head dim % 4
    (RTX4090, torch.float16, False, 0.1, 224, EFFICIENT),  # sm89 training: (192, 224]
    (RTX4090, torch.float16, False, 0.0, 256, FLASH),    # sm89: > 224 without dropout
    (H100, torch.bfloat16, False, 0.1, 128, FLASH),
    (MI300X, torch.bfloat16, False, 0.0, 128, FLASH),
])
def test_sdpa_backend_selection(target, dtype, mask, dropout, d, expected):
    with FakeTensorMode():
        q, k, v = qkv(dtype, d)
        m = torch.zeros(B, 1, S, S, dtype=dtype) if mask else None
        assert sdpa_backend(target, q, k, v, m, dropout) == expected


def _sdpa_node(target, dtype, dropout, mask=False):
    with FakeTensorMode(), CudaKernels(target) as kernels:
        q, k, v = qkv(dtype)
        m = torch.zeros(B, 1, S, S, dtype=dtype) if mask else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout)
        return out, out.grad_fn, kernels.applied


def test_flash_saves_out_logsumexp_and_rng_state_only():
    out, node, applied = _sdpa_node(A100, torch.float16, 0.1)
    assert applied == {"sdpa: flash": 1}
    s = saved(node)
    assert type(node).__name__ == "ScaledDotProductFlashAttentionBackward0"
    # by hand: out B*H*S*D fp16; logsumexp B*H*S fp32; RNG state 2 x 8 bytes
    assert nbytes(s["output"]) == B * H * S * D * 2
    assert tuple(s["logsumexp"].shape) == (B, H, S) and s["logsumexp"].dtype == torch.float32
    assert nbytes(s["rng_state"]) == 16
    big = [n for n, t in s.items() if isinstance(t, torch.Tensor) and t.numel() >= B * H * S * S]
    assert big == []   # no probabilities, no dropout mask


def test_efficient_saves_padded_logsumexp_and_no_probabilities():
    out, node, applied = _sdpa_node(V100, torch.float16, 0.1, mask=True)
    assert applied == {"sdpa: efficient": 1}
    s = saved(node)
    # logsumexp: B x H x round_up(S, 32) fp32 (S = 128 is already a multiple of 32)
    assert tuple(s["log_sumexp"].shape) == (B, H, S) and s["log_sumexp"].dtype == torch.float32
    assert nbytes(s["output"]) == B * H * S * D * 2
    assert nbytes(s["philox_seed"]) == 8 and nbytes(s["philox_offset"]) == 8
    assert nbytes(s["attn_bias"]) == B * S * S * 2   # the caller's mask, not a copy per head


def test_math_on_cuda_keeps_a_bool_dropout_mask():
    # V100 + bf16 -> math: probabilities upcast to fp32, and a 1-byte mask from native_dropout
    with FakeTensorMode(), CudaKernels(V100) as kernels:
        q, k, v = qkv(torch.bfloat16)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
        node = out.grad_fn
        while type(node).__name__ != "NativeDropoutBackward0":
            node = next(f for f, _ in node.next_functions if f is not None and "Dropout" in
                        type(f).__name__ or f is not None and type(f).__name__ in
                        ("UnsafeViewBackward0", "BmmBackward0", "ViewBackward0",
                         "ExpandBackward0", "ToCopyBackward0"))
        mask = saved(node)["result1"]
    assert kernels.applied == {"sdpa: math": 1}
    assert mask.dtype == torch.bool and nbytes(mask) == B * H * S * S


def test_dropout_mask_is_one_byte_on_cuda_and_four_on_cpu():
    n = 1000
    with FakeTensorMode():
        x = torch.empty(n, requires_grad=True)
        cpu = F.dropout(x, 0.1, True)
        with CudaKernels(A100) as kernels:
            cuda = F.dropout(x, 0.1, True)
            unchanged = F.dropout(x, 0.1, False)          # eval: no rule
    assert kernels.applied == {"dropout: native_dropout, bool mask": 1}
    mask = saved(cuda.grad_fn)["result1"]
    assert mask.dtype == torch.bool and nbytes(mask) == n
    # the CPU path saves the mask in the input's dtype (mul by a float mask)
    cpu_saved = [t for t in saved(cpu.grad_fn).values() if isinstance(t, torch.Tensor)]
    assert any(nbytes(t) == 4 * n for t in cpu_saved)


def test_cublas_workspace_sizes():
    assert cublas_workspace_bytes(V100) == 4096 * 1024 * 2 + 16 * 1024 * 8 == 8_519_680
    assert cublas_workspace_bytes(A100) == 8_519_680
    assert cublas_workspace_bytes(H100) == 32 * 1024 * 1024
    assert cublas_workspace_bytes(MI300X) == 128 * 1024 * 1024
    assert cublas_workspace_bytes(KernelTarget("mi250x", (9, 0), "amd")) == 32 * 1024 * 1024


def test_flash_backward_scratch_by_hand():
    # dq_accum fp32 B x round128(S) x H x round32(D) + softmax_d fp32 B x H x round128(S)
    assert flash_backward_scratch((2, 4, 100, 80), 80) == 4 * (2 * 128 * 4 * 96 + 2 * 4 * 128)
    assert flash_backward_scratch((1, 1, 128, 200), 200) == 4 * (128 * 256 + 128)


class Attn(nn.Module):
    def __init__(self, p=0.1):
        super().__init__()
        self.qkv = nn.Linear(D * H, 3 * D * H)
        self.p = p

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, H, D).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p)
        return F.dropout(o.transpose(1, 2).reshape(b, s, H * D), self.p, True)


def _batch(b):
    return (torch.randn(b, S, H * D),), torch.randn(b, S, H * D)


def test_estimate_applies_the_rules_and_saves_the_cpu_math_path_memory():
    cpu = estimate_step(Attn(), _batch, F.mse_loss, batch_size=4, precision="fp16")
    gpu = estimate_step(Attn(), _batch, F.mse_loss, batch_size=4, precision="fp16",
                        gpu="a100-40gb")
    assert cpu.kernel_rules == {}
    assert gpu.kernel_rules == {"sdpa: flash": 1, "dropout: native_dropout, bool mask": 1}
    # the CPU math path keeps B x H x S x S scores/probabilities; the GPU step does not
    scores = 4 * H * S * S * 2
    assert cpu.by_category["activations"] - gpu.by_category["activations"] > scores
    # two cuBLAS workspaces (forward and autograd threads) exist before the step: "other"
    extra = gpu.by_category["other"] - cpu.by_category.get("other", 0)
    assert abs(extra - 2 * 8_519_680) < 64        # (+ a few bytes of scalars: RNG state)
    assert gpu.profile.meta["kernels"] == "a100-40gb"


def test_checkpoint_recompute_runs_the_rules_too():
    model = nn.Sequential(Attn(), Attn())
    est = estimate_step(model, _batch, F.mse_loss, batch_size=2, precision="bf16",
                        checkpointing="every", blocks=list(model), gpu="h100-80gb")
    assert est.kernel_rules["sdpa: flash"] == 4      # 2 forward + 2 recomputed in backward
