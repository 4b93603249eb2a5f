"""The model and training step that produced lit-gpt's published LoRA memory table, rebuilt.

The resource table (Lightning-AI/litgpt, tutorials/resource-tables.md at commit
4839345a97a0a90bc5f2361664b04d665c9a0e89, "Last updated 10/20/2023, Lit-GPT commit 8641822")
was measured with lit-gpt's own model code, not Hugging Face's. This file is our own code,
written after reading Lightning-AI/lit-gpt at commit 8641822b (lit_gpt/model.py, lit_gpt/lora.py,
lit_gpt/rmsnorm.py, lit_gpt/config.py, lit_gpt/utils.py, finetune/lora.py); what matters for
memory, and where it differs from the transformers + peft stand-in used before:

* fused qkv: one `attn` Linear (n_embd -> 3 n_embd for these MHA models), viewed as
  (B, T, groups, 3, head) and permuted; q, k, v are slices of that one tensor. v stays a view,
  so the tensor SDPA saves for v keeps the whole (B, T, 3 n_embd) qkv output alive.
* LoRA on q and v (`LoRAQKVLinear`): ONE dropout on the block input (bool mask + dropped copy
  kept for lora_A's gradient), lora_A as a Linear to 2r, lora_B as a grouped conv1d
  (groups=2), then `zero_pad`: a zero (T, B, 3 n_embd) tensor filled by `index_copy` and
  multiplied by the scaling, added to the frozen projection's output.
* rotary embedding on the first `rope_n_elem` channels of q and k (cos/sin are float32
  buffers: `model.max_seq_length = longest` in train() rebuilds them with the default dtype),
  q and k re-assembled with `torch.cat`; SDPA with is_causal=True and no mask.
* RMSNorm (Llama 2) without a float32 upcast at that commit: `x * rsqrt(mean(x * x))`.
* the LM head in chunks of 128 positions (`lm_head_chunk_size=128`): a list of bf16 logits,
  which Fabric's bf16-true wrapper casts to float32 on the way out (`FabricBf16True` below);
  the last chunk sliced `[..., :-1, :]`, cross-entropy per float32 chunk (reduction="none"),
  `torch.cat(...).mean()`. Float32 logits plus their float32 log-softmax are 8 bytes per
  position and vocabulary entry, twice what a bf16 loss would keep.
* finetune/lora.py holds the logits in the loop variable `logits` until the next iteration
  reassigns it: they are alive during backward and the optimizer step. The loss function
  below attaches them to the loss tensor, which memprof's estimator keeps until after the
  optimizer step - the same lifetime within the step.
* batches are padded to their longest sample; the first iteration contains the longest
  training sample (get_batch with longest_seq_ix), which is where the peak is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LM_HEAD_CHUNK = 128   # finetune/lora.py: model(input_ids, lm_head_chunk_size=128)


@dataclass(frozen=True)
class LitConfig:
    """The lit_gpt.config.Config fields that shape memory (values from lit_gpt/config.py)."""
    n_layer: int
    n_head: int
    n_embd: int
    padded_vocab_size: int
    intermediate_size: int
    rotary_percentage: float
    parallel_residual: bool
    bias: bool
    lm_head_bias: bool
    shared_attention_norm: bool
    norm: str                  # "LayerNorm" | "RMSNorm"
    mlp: str                   # "GptNeoxMLP" | "LLaMAMLP"
    gelu_approximate: str = "none"
    norm_eps: float = 1e-5
    lora_r: int = 8            # finetune/lora.py: lora_r, lora_alpha, lora_dropout
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    rmsnorm_upcast: bool = False   # True: RMSNorm as lit-gpt #606 made it (float32 copy)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rope_n_elem(self) -> int:
        return int(self.rotary_percentage * self.head_size)


CONFIGS = {
    # phi-1_5: vocab 50257 padded to 51200, 24 layers, n_embd 2048, 32 heads, rotary 0.5,
    # shared attention norm, lm_head bias, GELU tanh; the rest are Config defaults
    "phi-1.5": LitConfig(n_layer=24, n_head=32, n_embd=2048, padded_vocab_size=51200,
                         intermediate_size=4 * 2048, rotary_percentage=0.5,
                         parallel_residual=True, bias=True, lm_head_bias=True,
                         shared_attention_norm=True, norm="LayerNorm", mlp="GptNeoxMLP",
                         gelu_approximate="tanh"),
    # stablelm-base-alpha-3b = the Config defaults: vocab 50254 padded (multiple 512) to 50688
    "stablelm-alpha-3b": LitConfig(n_layer=16, n_head=32, n_embd=4096,
                                   padded_vocab_size=50688, intermediate_size=4 * 4096,
                                   rotary_percentage=0.25, parallel_residual=True, bias=True,
                                   lm_head_bias=False, shared_attention_norm=False,
                                   norm="LayerNorm", mlp="GptNeoxMLP"),
    # Llama-2-7b-hf / 13b: vocab 32000 (multiple 64), no bias, RMSNorm, LLaMAMLP
    "llama-2-7b": LitConfig(n_layer=32, n_head=32, n_embd=4096, padded_vocab_size=32000,
                            intermediate_size=11008, rotary_percentage=1.0,
                            parallel_residual=False, bias=False, lm_head_bias=False,
                            shared_attention_norm=False, norm="RMSNorm", mlp="LLaMAMLP"),
    "llama-2-13b": LitConfig(n_layer=40, n_head=40, n_embd=5120, padded_vocab_size=32000,
                             intermediate_size=13824, rotary_percentage=1.0,
                             parallel_residual=False, bias=False, lm_head_bias=False,
                             shared_attention_norm=False, norm="RMSNorm", mlp="LLaMAMLP"),
}


class RMSNorm(nn.Module):
    """lit_gpt/rmsnorm.py at 8641822: computed in the input's dtype (no float32 copy). With
    `upcast`, as "Half precision fixes" (lit-gpt PR #606, commit 6178c7cc, 2023-10-24) made it:
    on a float32 copy of the input - the copy is what backward keeps (4 bytes per element
    instead of the 2 of the bf16 input)."""

    def __init__(self, size: int, eps: float, upcast: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.upcast = upcast

    def forward(self, x):
        dtype = x.dtype
        if self.upcast:
            x = x.float()
        norm_x = torch.mean(x * x, dim=-1, keepdim=True)
        out = self.weight * (x * torch.rsqrt(norm_x + self.eps))
        return out.to(dtype) if self.upcast else out


def _norm(cfg: LitConfig) -> nn.Module:
    if cfg.norm == "RMSNorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.rmsnorm_upcast)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)


class LoRAQKV(nn.Module):
    """Fused qkv projection with LoRA on query and value (enable_lora = (True, False, True))."""

    def __init__(self, cfg: LitConfig):
        super().__init__()
        c, r = cfg.n_embd, cfg.lora_r
        self.linear = nn.Linear(c, 3 * c, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.lora_dropout)
        self.lora_A = nn.Parameter(torch.zeros(2 * r, c))
        self.lora_B = nn.Parameter(torch.zeros(2 * c, r))
        self.scaling = cfg.lora_alpha / r
        # output channels the adapter writes: all of q, then all of v (lit-gpt's lora_ind)
        self.lora_ind = list(range(0, c)) + list(range(2 * c, 3 * c))

    def zero_pad(self, x):
        x = x.transpose(0, 1)
        out = self.linear.out_features
        result = x.new_zeros((*x.shape[:-1], out)).view(-1, out)
        index = torch.tensor(self.lora_ind, device=result.device)
        result = result.index_copy(1, index, x.reshape(-1, x.shape[-1]))
        return result.view((*x.shape[:-1], out)).transpose(0, 1)

    def forward(self, x):
        pretrained = self.linear(x)
        after_a = F.linear(self.dropout(x), self.lora_A)
        after_b = F.conv1d(after_a.transpose(-2, -1), self.lora_B.unsqueeze(-1),
                           groups=2).transpose(-2, -1)
        return pretrained + self.zero_pad(after_b) * self.scaling


def apply_rope(x, cos, sin):
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return ((x * cos) + (rotated * sin)).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LitConfig):
        super().__init__()
        self.cfg = cfg
        self.attn = LoRAQKV(cfg)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, cos, sin):
        b, t, c = x.shape
        cfg = self.cfg
        qkv = self.attn(x).view(b, t, cfg.n_head, 3, cfg.head_size).permute(0, 2, 3, 1, 4)
        q, k, v = qkv.split((1, 1, 1), dim=2)
        q = q.reshape(b, -1, t, cfg.head_size)
        k = k.reshape(b, -1, t, cfg.head_size)
        v = v.reshape(b, -1, t, cfg.head_size)
        n = cfg.rope_n_elem
        q = torch.cat((apply_rope(q[..., :n], cos, sin), q[..., n:]), dim=-1)
        k = torch.cat((apply_rope(k[..., :n], cos, sin), k[..., n:]), dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0,
                                           scale=1.0 / math.sqrt(cfg.head_size),
                                           is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: LitConfig):
        super().__init__()
        self.kind, self.approximate = cfg.mlp, cfg.gelu_approximate
        if cfg.mlp == "LLaMAMLP":
            self.fc_1 = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
            self.fc_2 = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        else:
            self.fc = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        if self.kind == "LLaMAMLP":
            return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, cfg: LitConfig):
        super().__init__()
        self.cfg = cfg
        self.norm_1 = _norm(cfg)
        self.attn = Attention(cfg)
        self.norm_2 = None if cfg.shared_attention_norm else _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        n_1 = self.norm_1(x)
        h = self.attn(n_1, cos, sin)
        if self.cfg.parallel_residual:
            n_2 = n_1 if self.cfg.shared_attention_norm else self.norm_2(x)
            return x + h + self.mlp(n_2)
        x = x + h
        return x + self.mlp(self.norm_2(x))


class LitGPT(nn.Module):
    """lit_gpt.lora.GPT with finetune/lora.py's LoRA settings; forward returns the chunked
    logits (a list of (B, <=128, vocab) tensors)."""

    def __init__(self, cfg: LitConfig, max_seq_length: int):
        super().__init__()
        self.cfg = cfg
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=cfg.lm_head_bias)
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = _norm(cfg)
        self.max_seq_length = max_seq_length

    def rope_cache(self):
        """float32 cos/sin of (max_seq_length, rope_n_elem), as build_rope_cache makes them
        when train() sets model.max_seq_length outside fabric.init_module."""
        n = self.cfg.rope_n_elem
        theta = 1.0 / (10000 ** (torch.arange(0, n, 2, dtype=torch.float32) / n))
        idx = torch.outer(torch.arange(self.max_seq_length, dtype=torch.float32),
                          theta).repeat(1, 2)
        return torch.cos(idx), torch.sin(idx)

    def forward(self, idx):
        t = idx.size(1)
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.wte(idx)
        for block in self.h:
            x = block(x, cos, sin)
        x = self.ln_f(x)
        return [self.lm_head(x_i) for x_i in x.split(LM_HEAD_CHUNK, dim=1)]


class FabricBf16True(nn.Module):
    """What `fabric.setup_module` wraps the model in for precision="bf16-true" (lightning
    2.1.0.rc0, the version the table names, and 71aed751, the commit lit-gpt 8641822 pins;
    src/lightning/fabric/wrappers.py + plugins/precision/half.py): `_FabricModule.
    forward` runs the model, then `HalfPrecision.convert_output` casts every floating tensor
    of the output to the default dtype, float32 - so the training loop holds float32 logits
    and the cross-entropy runs on them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        return [t.to(torch.get_default_dtype()) if t.is_floating_point() else t for t in out]


def build(name: str, seq_len: int, n_layer: int | None = None,
          rmsnorm_upcast: bool = False) -> tuple[nn.Module, LitConfig]:
    """The bf16-true LoRA model of `name` on the meta device, only the adapters trainable
    (mark_only_lora_as_trainable); `n_layer` shrinks it for quick per-layer checks,
    `rmsnorm_upcast` takes RMSNorm as lit-gpt #606 changed it."""
    cfg = LitConfig(**{**CONFIGS[name].__dict__, "rmsnorm_upcast": rmsnorm_upcast,
                       "n_layer": n_layer or CONFIGS[name].n_layer})
    with torch.device("meta"):
        model = LitGPT(cfg, seq_len).to(torch.bfloat16)
        cos, sin = model.rope_cache()
    model.register_buffer("cos", cos, persistent=False)
    model.register_buffer("sin", sin, persistent=False)
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n
    model = FabricBf16True(model)
    model.train()
    return model, cfg


def make_batch_fn(cfg: LitConfig, seq_len: int):
    """finetune/lora.py get_batch: ids padded with 0, labels padded with -1, all rows as long
    as the longest sample (here every row has the longest length: padding to it)."""
    def make_batch(b):
        ids = torch.randint(0, cfg.padded_vocab_size, (b, seq_len))
        return {"idx": ids}, ids.clone()
    return make_batch


def chunked_loss(logits, targets):
    """The training step's loss (finetune/lora.py + lit_gpt/utils.py chunked_cross_entropy at
    8641822); the logits stay referenced by the loss, as the loop variable keeps them."""
    logits = list(logits)
    logits[-1] = logits[-1][..., :-1, :]
    targets = targets[..., 1:]
    chunks = [c.reshape(-1, c.size(-1)) for c in logits]
    target_chunks = [t.reshape(-1) for t in targets.split(logits[0].size(1), dim=1)]
    losses = [F.cross_entropy(c, t, ignore_index=-1, reduction="none")
              for c, t in zip(chunks, target_chunks)]
    loss = torch.cat(losses).mean()
    loss.litgpt_logits = logits
    return loss
