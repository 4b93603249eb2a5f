"""DCAL: Dual Cross-Attention Learning (Zhu et al., CVPR 2022) on a ViT backbone, random weights.

Structure (L SA blocks, M = 1 GLCA block, PWCA in training only):

  SA      the ViT's L self-attention blocks; their attention maps feed attention rollout
          (math: kept in `model.sa_attention_history`; fused: folded into the rollout block by
          block, so only one B x N x N map is kept).
  rollout R = prod_l (0.5 * mean_h(A_l) + 0.5 * I), rows renormalised; the CLS row of R ranks the
          patch tokens.
  GLCA    one block with its own weights on the SA output: only the CLS token plus the top
          R = glca_ratio (10 %) patch tokens by rollout attend, as queries, to all tokens
          (memprof.tritonkernels.attention(..., q_index=...) with the fused backend).
  PWCA    training only, weights shared with the SA blocks: a second stream of image 1 whose
          queries, at each block, attend to the keys/values of image 1 (this stream) and of
          image 2 (the SA stream of the distractor image at the same depth), softmax-normalised
          jointly (attention(..., kv2=(k2, v2))).
  heads   one classifier each for SA, GLCA and PWCA (CLS token); the loss is the uncertainty-
          weighted sum  sum_i exp(-s_i) * CE_i + s_i  with learnable s_i clamped to [-2, 2]
          (loss="uncertainty", the seeds' choice) or the plain sum (loss="sum").

Forward signature:  model(x1, x2=None) -> dict of logits
    x1: (B, 3, img, img) the images to classify.
    x2: (B, 3, img, img) distractor images paired with x1 (e.g. a shuffled batch); used only in
        training mode (the PWCA branch), ignored in eval.
    returns {"sa": (B, C), "glca": (B, C)} plus "pwca": (B, C) when the PWCA branch ran.
    Inference prediction: (softmax(sa) + softmax(glca)) -> `DCAL.predict`.
    Loss: `model.compute_loss(outputs, targets)` (targets: (B,) labels of x1).

`attention_backend`:
    "math"  - hand-written attention: per-head softmax(QK^T) (B, H, N, N) maps with their graph;
              the SA maps are appended to `self.sa_attention_history`. With
              `detach_history=False` (the seed-000 bug) they are appended without `.detach()`
              and the rollout is computed from them with autograd on: the history and the rollout
              (kept in `self.attention_rollout`) then hold autograd graphs alive after the step.
    "fused" - memprof.tritonkernels.attention: nothing N x N is saved for backward; rollout uses
              the kernels' head-averaged maps (B, N, N), detached, each folded into the running
              rollout as its block finishes (`sa_attention_history` stays empty): L - 1 fewer
              B x N x N maps alive at the peak than keeping them all.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vit import Block, VisionTransformer, init_vit_weights

__all__ = ["DCALConfig", "DCAL", "UncertaintyWeightedLoss", "attention_rollout", "rollout_step",
           "CONFIGS"]


@dataclass(frozen=True)
class DCALConfig:
    img_size: int = 448
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 200          # CUB-200-2011
    dim: int = 768
    depth: int = 12                 # L SA blocks
    heads: int = 12
    mlp_ratio: float = 4.0
    glca_ratio: float = 0.10        # R: fraction of patch tokens selected by rollout
    drop: float = 0.0
    attn_drop: float = 0.0          # dropout on attention probabilities (math backend only)
    attention_backend: str = "math"
    kernel_backend: str = "auto"    # memprof.tritonkernels backend for "fused"
    detach_history: bool = True
    pwca: bool = True
    loss: str = "uncertainty"       # or "sum"
    grad_checkpointing: bool = False  # recompute each SA block in backward

    def replace(self, **overrides) -> "DCALConfig":
        names = {f.name for f in fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise TypeError(f"unknown DCAL option(s) {bad}; expected some of {sorted(names)}")
        return replace(self, **overrides)


CONFIGS = {
    # small enough for unit tests: 17 tokens, 2 SA blocks
    "dcal-vit-tiny": DCALConfig(img_size=32, patch_size=8, num_classes=10, dim=64, depth=2,
                                heads=2),
    # ViT-B/16 at 448 px: 785 tokens, 12 blocks, 12 heads, dim 768, R = 10 %
    "dcal-vit-b16": DCALConfig(),
}


def attention_rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of head-averaged maps [(B, N, N)] * L (first block
    first): R = A_L' ... A_1', A' = rownorm(0.5 A + 0.5 I). Differentiable if the maps are."""
    if not maps:
        raise ValueError("maps: expected at least one attention map")
    rollout = None
    for a in maps:
        rollout = rollout_step(rollout, a)
    return rollout


def rollout_step(rollout: torch.Tensor | None, a: torch.Tensor) -> torch.Tensor:
    """Fold the next block's head-averaged map a (B, N, N) into the rollout so far (None before
    the first block): rownorm(0.5 a + 0.5 I) @ rollout."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    a = 0.5 * a + 0.5 * eye
    a = a / a.sum(dim=-1, keepdim=True)
    return a if rollout is None else torch.matmul(a, rollout)


class UncertaintyWeightedLoss(nn.Module):
    """sum_i exp(-s_i) * L_i + s_i (Kendall et al.), s_i learnable, clamped to [min, max]."""

    def __init__(self, n: int = 3, min_log_var: float = -2.0, max_log_var: float = 2.0):
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(n))
        self.min_log_var = min_log_var
        self.max_log_var = max_log_var

    def forward(self, losses: list[torch.Tensor]) -> torch.Tensor:
        s = self.log_vars.clamp(self.min_log_var, self.max_log_var)
        return sum(torch.exp(-s[i]) * loss + s[i] for i, loss in enumerate(losses))


class DCAL(VisionTransformer):
    """DCAL on a ViT backbone; see the module docstring for the forward signature."""

    def __init__(self, cfg: DCALConfig | None = None, **overrides):
        cfg = (cfg or DCALConfig()).replace(**overrides) if overrides else (cfg or DCALConfig())
        if cfg.loss not in ("uncertainty", "sum"):
            raise ValueError(f"loss: expected 'uncertainty' or 'sum', got {cfg.loss!r}")
        if not 0.0 < cfg.glca_ratio <= 1.0:
            raise ValueError(f"glca_ratio: expected a fraction in (0, 1], got {cfg.glca_ratio}")
        super().__init__(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                         num_classes=cfg.num_classes, dim=cfg.dim, depth=cfg.depth,
                         heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, drop=cfg.drop,
                         attn_drop=cfg.attn_drop, attention_backend=cfg.attention_backend,
                         kernel_backend=cfg.kernel_backend)
        self.cfg = cfg
        self.glca_block = Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.drop, cfg.attn_drop,
                                cfg.attention_backend, cfg.kernel_backend)
        self.glca_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.glca_head = nn.Linear(cfg.dim, cfg.num_classes)
        self.pwca_head = nn.Linear(cfg.dim, cfg.num_classes)
        self.criterion = UncertaintyWeightedLoss(3) if cfg.loss == "uncertainty" else None
        for m in (self.glca_block, self.glca_norm, self.glca_head, self.pwca_head):
            m.apply(init_vit_weights)
        self.sa_attention_history: list[torch.Tensor] = []
        self.attention_rollout: torch.Tensor | None = None
        self.glca_index: torch.Tensor | None = None

    @property
    def num_selected(self) -> int:
        """R: patch tokens selected for GLCA (the CLS token comes on top)."""
        n = self.patch_embed.num_patches
        return max(1, min(n, int(round(self.cfg.glca_ratio * n))))

    # ------------------------------------------------------------------ pieces
    def _sa_block(self, blk, x):
        if self.cfg.grad_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint  # noqa: PLC0415
            return checkpoint(lambda t: blk(t, need_weights=True), x, use_reentrant=False)
        return blk(x, need_weights=True)

    def _record(self, weights: torch.Tensor, batch: int, rollout: torch.Tensor | None):
        """Image 1's maps (the first `batch` rows) for rollout. Math keeps them in the history
        (per-head maps, a view of what autograd saved anyway; the seed-000 bug keeps the graph
        attached: detach_history=False) and rolls out at the end; fused folds each head-mean
        map into the running rollout now. Returns the rollout so far (fused) or None (math)."""
        if self.cfg.attention_backend == "math":
            weights = weights[:batch]
            if self.cfg.detach_history:
                weights = weights.detach()
            self.sa_attention_history.append(weights)
            return None
        with torch.no_grad():
            return rollout_step(rollout, weights[:batch].float())

    def _rollout(self, running: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.attention_backend != "math":
            return running
        maps = [w.mean(dim=1) for w in self.sa_attention_history]
        if not self.cfg.detach_history:
            return attention_rollout(maps)  # the bug: a graph through every SA map
        with torch.no_grad():
            return attention_rollout([m.float() for m in maps])

    def select_tokens(self, rollout: torch.Tensor) -> torch.Tensor:
        """(B, 1 + R) int64: the CLS token, then the top-R patch tokens by the CLS rollout row."""
        cls_row = rollout[:, 0, 1:].detach()
        top = torch.topk(cls_row, self.num_selected, dim=-1).indices + 1
        cls = torch.zeros((rollout.shape[0], 1), dtype=top.dtype, device=top.device)
        return torch.cat([cls, top], dim=1)

    # ------------------------------------------------------------------ forward
    def forward(self, x1: torch.Tensor, x2: torch.Tensor | None = None) -> dict:
        if x2 is not None and x2.shape != x1.shape:
            raise ValueError(f"x2: shape {tuple(x2.shape)} differs from x1 {tuple(x1.shape)}")
        B = x1.shape[0]
        use_pwca = self.training and self.cfg.pwca and x2 is not None
        # SA stream: image 1 (and the distractor image 2, whose keys/values PWCA needs)
        x = self.embed(torch.cat([x1, x2], dim=0) if use_pwca else x1)
        xp = x[:B] if use_pwca else None  # PWCA stream of image 1
        self.sa_attention_history = []
        running = None
        for blk in self.blocks:
            y, weights, (k, v) = self._sa_block(blk, x)
            if use_pwca:
                # image 1's PWCA queries attend to its own keys and to image 2's (same depth)
                xp, _, _ = blk(xp, kv2=(k[B:], v[B:]))
            running = self._record(weights, B, running)
            del weights
            x = y
        x1_tokens = x[:B]
        out = {"sa": self.head(self.norm(x1_tokens)[:, 0])}

        rollout = self._rollout(running)
        self.attention_rollout = rollout
        index = self.select_tokens(rollout)
        self.glca_index = index
        g, _, _ = self.glca_block(x1_tokens, q_index=index)
        out["glca"] = self.glca_head(self.glca_norm(g)[:, 0])
        if use_pwca:
            out["pwca"] = self.pwca_head(self.norm(xp)[:, 0])
        return out

    def compute_loss(self, outputs: dict, targets: torch.Tensor) -> torch.Tensor:
        losses = [F.cross_entropy(outputs[k], targets) for k in ("sa", "glca", "pwca")
                  if k in outputs]
        # eval has no PWCA loss: the criterion weights the first two
        return sum(losses) if self.criterion is None else self.criterion(losses)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities at inference: softmax(SA) + softmax(GLCA), halved."""
        was = self.training
        self.eval()
        try:
            out = self(x)
        finally:
            self.train(was)
        return 0.5 * (out["sa"].softmax(-1) + out["glca"].softmax(-1))


