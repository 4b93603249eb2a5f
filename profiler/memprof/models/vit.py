"""A plain Vision Transformer (ViT) in PyTorch, with a switchable attention implementation.

`attention_backend`:
    "math":  softmax(q k^T * scale) materialised per head, (B, H, N, N) with a graph behind it -
             what most hand-written ViT / DCAL code does.
    "fused": `memprof.tritonkernels.attention` (Triton flash-style kernels on CUDA, or PyTorch
             `scaled_dot_product_attention` on the CPU): no N x N tensor is saved for backward;
             attention maps, when asked for, come back head-averaged and detached.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from memprof.tritonkernels import attention as fused_attention
from memprof.tritonkernels import concat_kv_gather_q

ATTENTION_BACKENDS = ("math", "fused")


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), index (B, R) -> (B, R, C)."""
    return torch.gather(x, 1, index[:, :, None].expand(-1, -1, x.shape[-1]))


def attend(q, k, v, *, kv2=None, q_index=None, need_weights: bool = False,
           backend: str = "math", attn_drop: nn.Module | None = None,
           kernel_backend: str = "auto"):
    """Multi-head attention on (B, H, N, d) tensors. Returns (out (B, H, M, d), weights).

    weights: None unless need_weights; "math": the per-head probabilities (B, H, M, Nk) with
    their graph; "fused": head-averaged probabilities (B, M, Nk), detached.
    kv2 = (k2, v2) adds keys/values of a second source (PWCA); q_index (B, R) selects the query
    rows that attend (GLCA)."""
    if backend == "fused":
        if attn_drop is not None and attn_drop.p > 0 and attn_drop.training:
            raise ValueError("attention_backend='fused' does not implement dropout on the "
                             "attention probabilities; expected attn_drop=0")
        res = fused_attention(q, k, v, kv2=kv2, q_index=q_index,
                              need_weights="head_mean" if need_weights else None,
                              backend=kernel_backend)
        return res if need_weights else (res, None)
    if backend != "math":
        raise ValueError(f"attention_backend: expected one of {ATTENTION_BACKENDS}, got "
                         f"{backend!r}")
    q, k, v = concat_kv_gather_q(q, k, v, kv2, q_index)
    attn = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    attn = attn.softmax(dim=-1)
    dropped = attn_drop(attn) if attn_drop is not None else attn
    out = torch.matmul(dropped, v)
    return out, (attn if need_weights else None)


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size: {img_size} is not a multiple of patch_size {patch_size}")
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim: {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x):
        """x (B, N, C) -> q, k, v each (B, H, N, d) (views of one projection).

        unbind, not qkv[0], qkv[1], qkv[2]: the backward of three selects allocates three
        zero-filled tensors the size of the whole projection and sums them; unbind's backward
        stacks the three gradients into one."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v

    def project(self, out):
        """out (B, H, M, d) -> (B, M, C)."""
        B, H, M, d = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, M, H * d)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block usable as SA, PWCA (kv2) or GLCA (q_index) block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 attn_drop: float = 0.0, attention_backend: str = "math",
                 kernel_backend: str = "auto"):
        super().__init__()
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend: expected one of {ATTENTION_BACKENDS}, got "
                             f"{attention_backend!r}")
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.attention_backend = attention_backend
        self.kernel_backend = kernel_backend

    def forward(self, x, *, kv2=None, q_index=None, need_weights: bool = False):
        """x (B, N, C). kv2: (k2, v2) per-head keys/values of another image (PWCA).
        q_index (B, R): only these rows attend and are returned (GLCA): output (B, R, C).
        Returns (y, weights, (k, v)); (k, v) are this block's keys/values of x (for PWCA)."""
        q, k, v = self.attn.qkv_heads(self.norm1(x))
        out, weights = attend(q, k, v, kv2=kv2, q_index=q_index, need_weights=need_weights,
                              backend=self.attention_backend, attn_drop=self.attn.attn_drop,
                              kernel_backend=self.kernel_backend)
        rows = gather_rows(x, q_index) if q_index is not None else x
        y = rows + self.attn.project(out)
        y = y + self.mlp(self.norm2(y))
        return y, weights, (k, v)


def init_vit_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        nn.init.trunc_normal_(module.weight, std=math.sqrt(1.0 / fan_in))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """Plain ViT classifier: forward(x (B, 3, img, img)) -> logits (B, num_classes)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, dim: int = 768, depth: int = 12, heads: int = 12,
                 mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0,
                 attention_backend: str = "math", kernel_backend: str = "auto"):
        super().__init__()
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
        self.pos_drop = nn.Dropout(drop)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, drop, attn_drop, attention_backend, kernel_backend)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_vit_weights)

    @property
    def num_tokens(self) -> int:
        return self.patch_embed.num_patches + 1

    def embed(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward(self, x):
        x = self.embed(x)
        for blk in self.blocks:
            x, _, _ = blk(x)
        return self.head(self.norm(x)[:, 0])

