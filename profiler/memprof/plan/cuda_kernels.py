"""What the CUDA (and ROCm) kernels of the target GPU allocate and save, modelled on CPU fakes.

An estimate runs on fake *CPU* tensors (fake CUDA tensors abort autograd on the CPU build of
torch), so the ops whose CUDA kernels keep different memory than the CPU kernels are replaced,
op by op, by `CudaKernels` (a TorchFunctionMode active during the step) and `KernelScratch`
(called by the recording mode for every aten op). The rules, with their sources (PyTorch
2.x source tree; `sdp_utils.cpp` = aten/src/ATen/native/transformers/cuda/sdp_utils.cpp):

Dropout (`F.dropout`, `torch.dropout`; aten/src/ATen/native/Dropout.cpp)
    Training, 0 < p < 1, not in place, on CUDA: `at::dropout` runs the fused `native_dropout`
    -> output + a **bool mask** (1 byte per element) saved by `NativeDropoutBackward0`. The CPU
    path (`_dropout_impl`) saves a mask in the input's dtype (4 bytes for fp32). In-place
    dropout (`inplace=True`) takes the unfused path on CUDA too (mask in the input's dtype):
    left as the CPU runs it. Feature/alpha dropout: the same on both devices (left alone).

scaled_dot_product_attention (`select_sdp_backend` in sdp_utils.cpp; order flash ->
memory-efficient -> math)
    flash      NVIDIA sm80..sm121; fp16/bf16 only; no attn_mask (is_causal is fine, but only
               with seq_q == seq_k); q, k, v the same head dim <= 256; on sm86/sm89/sm120 in
               training only head dim <= 192, or > 224 without dropout.
               Saves q, k, v, out, logsumexp (B x H x S_q fp32) and the RNG state (2 x int64)
               - `_scaled_dot_product_flash_attention`; no probabilities, no dropout mask.
               Backward (flash_api.cpp mha_bwd) allocates two fp32 scratch buffers while it
               runs: dq_accum (B x round128(S_q) x H x round32(D), D > 192: 256) and softmax_d
               (B x H x round128(S_q)). Before it, `_flash_attention_backward`
               (attention_backward.cu) takes `grad_out.contiguous()` and `out.contiguous()` of
               the (B, S, H, D) transposes it is given: a copy of each (q's dtype) unless that
               transpose is already contiguous - `out` is laid out like q (`empty_like`), so a
               q made contiguous as (B, H, S, D) (rotary embeddings, torch.cat) costs one.
               Grouped-query heads (enable_gqa, H_kv < H): flash takes them natively
               (`check_batch_size_and_num_heads_dense<true>` in its constraints): k and v
               are saved unexpanded; the backward allocates dk_expanded and dv_expanded
               (B x S_k x H x D each, q's dtype) and sums them into dk, dv.
    efficient  NVIDIA sm50..sm121; fp16/fp32 (+ bf16 on sm80+); q and k the same head dim,
               q/v head dims divisible by the GEMM alignment (16-bit: 8; fp32: 4 on sm80+,
               1 before - `minimum_gemm_alignment`); any additive mask; dropout.
               Saves q, k, v, the mask, out, logsumexp (B x H x round32(S_q) fp32) and the
               philox seed/offset - `_scaled_dot_product_efficient_attention`. A bool mask
               is first converted to an additive one in q's dtype (`convert_boolean_attn_mask`).
               No grouped-query heads (`check_batch_size_and_num_heads_dense<false>`): those
               go to math, which expands k and v (repeat_interleave copies).
               Backward scratch (attention_backward.cu `_efficient_attention_backward`: a copy
               of grad_out unless its (B, S, H, D) transpose is contiguous, and the
               kernel `AttentionBackwardKernel` of mem_eff_attention/kernel_backward.h, picked
               as kernels/generate_kernels.py orders them: aligned, no dropout variant when
               none is needed, the smallest kMaxK >= max(D, Dv), then the larger block):
               block_i = 128 when kMaxK > 64 on sm80/sm90/sm100 (64 elsewhere: less shared
               memory), output_in_rf = half and kMaxK <= block_i, block_j = 128 when
               (half, sm80+, output_in_rf and kMaxK > 64), else 64. It allocates `delta`
               (B x H x S_q fp32) when the kernel computes it (half and (output_in_rf or not
               sm70)), else the composite (grad_out.float() * out.float()).sum(-1) (its
               temporaries while the expression lives), and a workspace of
               B x H x round4(gq + gk + gv) fp32: gq = ceil(S_q/block_i) x ceil(D/block_j) x
               (block_i x block_j + 4) (the split-keys dQ accumulator, always on),
               gk/gv (half, not output_in_rf) = splits x round(S_k, block_j) x round(D or Dv,
               block_i), splits = ceil(S_k/block_j), 1 when B*H >= 256 and S_k <= 2 block_j,
               at most 200 // (B*H), at least 1.
    math       anything else: the composite `_scaled_dot_product_attention_math` - fp16/bf16
               inputs upcast to fp32 (default `allowFP16BF16ReductionMathSDP` = False), the
               B x H x S_q x S_k scores and probabilities are kept, and dropout on CUDA is the
               fused `native_dropout` (bool mask), not the CPU's float mask.
    cuDNN attention is tried first only on sm90/sm100 with cuDNN > 9.15 (recent wheels). Its
    saved tensors are of the flash kind (out + fp32 softmax stats B x H x S_q): modelled as
    flash. ROCm (AOTriton) offers flash and memory-efficient attention on MI200/MI300 with the
    same saved tensors; memory-efficient without grouped-query heads.

cuBLAS / cuBLASLt workspaces (aten/src/ATen/cuda/CublasHandlePool.cpp)
    One workspace per (cuBLAS handle, stream), handles are per thread: the forward thread and
    the autograd engine's device thread each allocate one through the caching allocator at
    their first GEMM, and keep it for the life of the process. Size `parseChosenWorkspaceSize`:
    ":4096:2:16:8" = 4096 KiB x 2 + 16 KiB x 8 = 8,519,680 bytes; 32 MiB on sm90 / sm10x /
    sm12x; ROCm 32 MiB, 128 MiB on gfx94x/gfx95x (MI300). cuBLASLt shares it (the unified
    workspace is the default).

Not modelled (named in every plan's assumptions): cuDNN convolution workspaces - their size is
what cuDNN reports for the algorithm it picks (cudnnGet*WorkspaceSize), known only with cuDNN;
PyTorch asks for it through the caching allocator and never lets it cause an OOM by itself:
Conv_v7.cpp caps benchmarked workspaces at the allocator's largest free block, and both
Conv_v7.cpp and Conv_v8.cpp catch the allocation failure and try the next algorithm (down to
ones without workspace). NCCL buffers. The CUDA context is not in the step: `memprof.plan.gpus`
subtracts it from the usable memory.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["KernelTarget", "target_for", "sdpa_backend", "cublas_workspace_bytes",
           "flash_backward_scratch", "efficient_backward_scratch", "contiguous_copy_bytes",
           "CudaKernels", "KernelScratch", "FLASH", "EFFICIENT", "MATH", "NOT_MODELLED"]

FLASH, EFFICIENT, MATH = "flash", "efficient", "math"
_LOW = (torch.float16, torch.bfloat16)
NOT_MODELLED = ("cuDNN convolution workspaces (sized by cuDNN at run time; PyTorch falls back "
                "to smaller-workspace algorithms rather than run out of memory)", "NCCL buffers")


@dataclass(frozen=True)
class KernelTarget:
    """What the kernel rules need to know about the GPU."""
    name: str
    compute_capability: Tuple[int, int]
    vendor: str = "nvidia"          # "nvidia" | "amd" (ROCm: compute_capability = gfx major/minor)

    @property
    def rocm(self) -> bool:
        return self.vendor == "amd"


def target_for(gpu) -> Optional[KernelTarget]:
    """A GPU table entry -> its KernelTarget; a GPU without a known compute capability is
    treated as sm80 (the most common training GPU generation), and says so in its name."""
    if gpu is None:
        return None
    cc = getattr(gpu, "compute_capability", None)
    vendor = getattr(gpu, "vendor", "nvidia")
    if cc is None:
        return KernelTarget(f"{gpu.name} (assumed sm80)", (8, 0), vendor)
    return KernelTarget(gpu.name, tuple(cc), vendor)


# ------------------------------------------------------------------------------ workspaces
def cublas_workspace_bytes(t: KernelTarget) -> int:
    """Default cuBLAS workspace of one (handle, stream), see the module docstring."""
    major, minor = t.compute_capability
    if t.rocm:
        return (128 if (major, minor) >= (9, 4) else 32) * 1024 * 1024
    if major in (9, 10, 12):
        return 4096 * 8 * 1024
    return 4096 * 1024 * 2 + 16 * 1024 * 8


def _round(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def flash_backward_scratch(q_shape, head_dim: int, k_shape=None, itemsize: int = 2) -> int:
    """Bytes of flash backward's dq_accum + softmax_d (fp32) for q of shape (B, H, S_q, D), and
    with grouped-query k of shape (B, H_kv, S_k, D), H_kv < H, its dk/dv_expanded."""
    b, h, s = int(q_shape[0]), int(q_shape[1]), int(q_shape[2])
    d = _round(head_dim, 32) if head_dim <= 192 else 256
    sq = _round(s, 128)
    n = 4 * (b * sq * h * d + b * h * sq)
    if k_shape is not None and int(k_shape[1]) != h:
        n += 2 * b * int(k_shape[2]) * h * head_dim * itemsize
    return n


def contiguous_copy_bytes(t: torch.Tensor) -> int:
    """Bytes of the `.contiguous()` copy the CUDA attention backward makes of `t`, a
    (B, H, S, D) tensor it sees as its (B, S, H, D) transpose: 0 when that is contiguous."""
    if t.transpose(1, 2).is_contiguous():
        return 0
    return t.numel() * t.element_size()


def _efficient_blocks(t: KernelTarget, half: bool, max_k: int) -> tuple[int, int, bool]:
    """(block_i, block_j, output_in_rf) of the backward kernel dispatched (module docstring)."""
    kmax = next(m for m in (32, 64, 128, 1 << 16) if max_k <= m)
    big_smem = t.compute_capability in ((8, 0), (9, 0)) or t.compute_capability[0] == 10
    bi = 128 if (kmax > 64 and big_smem) else 64
    in_rf = half and kmax <= bi
    bj = 128 if (half and t.compute_capability >= (8, 0) and in_rf and kmax > 64) else 64
    return bi, bj, in_rf


def efficient_backward_scratch(t: KernelTarget, q_shape, k_shape, dv: int,
                               dtype: torch.dtype) -> int:
    """Bytes `_efficient_attention_backward` allocates beyond dq, dk, dv for q (B, H, S_q, D),
    k (B, H, S_k, D) and v's head dim `dv` on `t` (module docstring)."""
    b, h, m, d = (int(x) for x in q_shape)
    n = int(k_shape[2])
    half = dtype in _LOW
    if t.rocm:   # AOTriton: delta (B x H x S_q fp32) unless its fused backward runs
        fused = max(d, dv) <= 192 and max(d, dv) * m < 64 * 512
        return 0 if fused else 4 * b * h * m
    bi, bj, in_rf = _efficient_blocks(t, half, max(d, dv))
    if half and (in_rf or t.compute_capability[0] != 7):
        delta = 4 * b * h * m
    else:   # (grad_out.float() * out.float()).sum(-1): casts (half only), product, sum
        delta = 4 * b * m * h * dv * (3 if half else 1) + 2 * 4 * b * h * m
    gq = -(-m // bi) * -(-d // bj) * (bi * bj + 4)
    gk = gv = 0
    if half and not in_rf:
        splits = -(-n // bj)
        if b * h >= 256 and n <= 2 * bj:
            splits = 1
        splits = max(1, min(splits, 200 // (b * h)))
        gk = splits * _round(n, bj) * _round(d, bi)
        gv = splits * _round(n, bj) * _round(dv, bi)
    return delta + 4 * b * h * _round(gq + gk + gv, 4)


# ------------------------------------------------------------------------------ SDPA choice
def _head_dims(q, k, v) -> tuple[int, int, int]:
    return int(q.shape[-1]), int(k.shape[-1]), int(v.shape[-1])


def _can_flash(t: KernelTarget, q, k, v, has_mask, dropout_p, is_causal, needs_grad) -> bool:
    dq, dk, dv = _head_dims(q, k, v)
    if has_mask or q.dtype not in _LOW or not dq == dk == dv or dq > 256:
        return False
    if is_causal and q.shape[-2] != k.shape[-2]:
        return False
    if t.rocm:
        return t.compute_capability >= (9, 0)      # MI200 (gfx90a) / MI300 (gfx94x)
    cc = t.compute_capability
    if not (8, 0) <= cc <= (12, 1):
        return False
    if needs_grad and ((8, 6) <= cc <= (8, 9) or (12, 0) <= cc <= (12, 1)):
        return dq <= 192 or (dropout_p == 0 and dq > 224)
    return True


def _can_efficient(t: KernelTarget, q, k, v, dropout_p, enable_gqa) -> bool:
    dq, dk, dv = _head_dims(q, k, v)
    major = t.compute_capability[0]
    half = q.dtype in _LOW
    if q.shape[-3] != k.shape[-3] or k.shape[-3] != v.shape[-3]:
        return False                    # no grouped-query heads (module docstring)
    if t.rocm:
        if t.compute_capability < (9, 0):
            return False
        align = 8 if half else 4
    else:
        if not (5, 0) <= t.compute_capability <= (12, 1):
            return False
        use_tc = major >= 8 or (major >= 7 and half)
        align = max(4 if major >= 8 else 1, (128 // (16 if half else 32)) if use_tc else 1)
    allowed = (torch.float16, torch.float32) + \
        ((torch.bfloat16,) if (major >= 8 or t.rocm) else ())
    return (q.dtype in allowed and dq == dk and dq % align == 0 and dv % align == 0
            and dq > 0 and dv > 0)


def sdpa_backend(t: KernelTarget, q, k, v, attn_mask=None, dropout_p: float = 0.0,
                 is_causal: bool = False, needs_grad: bool = True,
                 enable_gqa: bool = False) -> str:
    """Which SDPA kernel PyTorch runs on `t` for these (4-D, dense) inputs: 'flash',
    'efficient' or 'math' (see the module docstring for the rules)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return MATH
    if _can_flash(t, q, k, v, attn_mask is not None, dropout_p, is_causal, needs_grad):
        return FLASH
    if _can_efficient(t, q, k, v, dropout_p, enable_gqa):
        return EFFICIENT
    return MATH


# ------------------------------------------------------------------------------ the kernels
def _amp_cast(*tensors):
    """CUDA autocast runs SDPA in the low precision: cast floating inputs like it does (the
    emulation runs CPU autocast, which this function-level replacement sits above)."""
    if not torch.is_autocast_enabled("cpu"):
        return tensors
    low = torch.get_autocast_dtype("cpu")
    return tuple(x.to(low) if isinstance(x, torch.Tensor) and x.is_floating_point()
                 and x.dtype != low else x for x in tensors)


def _additive_mask(mask, dtype):
    if mask is not None and mask.dtype == torch.bool:   # convert_boolean_attn_mask
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(mask.logical_not(),
                                                                float("-inf"))
    return mask


def _expand_gqa(q, k, v, enable_gqa):
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        return k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    return k, v


def math_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
    """`_scaled_dot_product_attention_math` as CUDA runs it (fused bool-mask dropout)."""
    origin = q.dtype
    q, k, v = (x.float() if x.dtype in _LOW else x for x in (q, k, v))
    s = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        attn_mask = _additive_mask(causal, q.dtype)
    k, v = _expand_gqa(q, k, v, enable_gqa)
    attn = torch.matmul(q * s, k.transpose(-2, -1) * s)
    if attn_mask is not None:
        attn = attn + attn_mask
    attn = torch.ops.aten._safe_softmax(attn, -1)
    if dropout_p > 0.0:
        attn = torch.native_dropout(attn, dropout_p, True)[0]
    return torch.matmul(attn, v).to(origin)


class CudaKernels(TorchFunctionMode):
    """Replaces dropout and SDPA by what their CUDA kernels on `target` allocate and save;
    `applied` counts the rules used (for the plan's assumptions)."""

    def __init__(self, target: KernelTarget):
        super().__init__()
        self.target = target
        self.applied: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func is F.dropout or func is torch.dropout:
            out = self._dropout(func, args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)

    def _dropout(self, func, args, kwargs):
        names = ("input", "p", "training", "inplace") if func is F.dropout \
            else ("input", "p", "train")
        a = dict(zip(names, args)) | kwargs
        x, p = a.get("input"), float(a.get("p", 0.5))
        train = a.get("training", a.get("train", True))
        if not (isinstance(x, torch.Tensor) and train and 0.0 < p < 1.0 and x.numel()
                and not a.get("inplace", False)):
            return None
        self.applied["dropout: native_dropout, bool mask"] += 1
        return torch.native_dropout(x, p, True)[0]

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
              scale=None, enable_gqa=False):
        q, k, v, mask = _amp_cast(query, key, value, attn_mask)
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v) if isinstance(t, torch.Tensor))
        backend = sdpa_backend(self.target, q, k, v, mask, dropout_p, is_causal, needs_grad,
                               enable_gqa)
        self.applied[f"sdpa: {backend}"] += 1
        if backend == FLASH:    # grouped-query heads natively: k, v not expanded
            return torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, dropout_p, is_causal, False, scale=scale)[0]
        if backend == EFFICIENT:    # same heads for q, k, v (GQA goes to math)
            mask = _additive_mask(mask, q.dtype)
            if mask is not None:
                mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, mask, needs_grad, dropout_p, is_causal, scale=scale)[0]
        return math_sdpa(q, k, v, _additive_mask(mask, q.dtype), dropout_p, is_causal, scale,
                         enable_gqa)


class KernelScratch:
    """The memory CUDA kernels allocate beyond their outputs: `scratch(func, args)` -> bytes
    of transient scratch of one aten op (freed when it returns); `persistent(model)` ->
    [(what, bytes)] allocated once per process and kept (the cuBLAS workspaces)."""

    def __init__(self, target: KernelTarget):
        self.target = target

    def persistent(self, model) -> list[tuple[str, int]]:
        """The two cuBLAS workspaces (forward thread, autograd thread) when the model runs
        GEMMs (has a parameter of 2+ dims outside convolutions and embeddings). They exist
        from the first step on, so they are recorded before the step (category "other")."""
        skip = (torch.nn.modules.conv._ConvNd, torch.nn.Embedding, torch.nn.EmbeddingBag)
        gemm = any(p.dim() >= 2 for m in model.modules() if not isinstance(m, skip)
                   for p in m.parameters(recurse=False))
        if not gemm:
            return []
        n = cublas_workspace_bytes(self.target)
        return [("cublas workspace (forward thread)", n),
                ("cublas workspace (autograd thread)", n)]

    def scratch(self, func, args) -> int:
        if getattr(func, "namespace", None) == "tritonkernels":   # memprof's fused attention
            from ..tritonkernels import kernel_scratch_bytes
            return kernel_scratch_bytes(func, args)
        if func is _FLASH_BACKWARD:     # (grad_out, query, key, value, out, ...)
            q, k = args[1], args[2]
            return flash_backward_scratch(q.shape, int(q.shape[-1]), k.shape,
                                          q.element_size()) \
                + contiguous_copy_bytes(args[0]) + contiguous_copy_bytes(args[4])
        if func is _EFFICIENT_BACKWARD:   # (grad_out, query, key, value, attn_bias, out, ...)
            q, k, v = args[1], args[2], args[3]
            return efficient_backward_scratch(self.target, q.shape, k.shape,
                                              int(v.shape[-1]), q.dtype) \
                + contiguous_copy_bytes(args[0])
        return 0


_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_backward.default
_EFFICIENT_BACKWARD = torch.ops.aten._scaled_dot_product_efficient_attention_backward.default
