"""bert-large's self-attention as the January 2022 measurement ran it (transformers ~4.15, PyTorch 1.10).

The source (huggingface/transformers docs/source/en/perf_train_gpu_one.mdx, commit 0016acf7)
trained `BertForSequenceClassification` with the Trainer in January 2022. Two things about
the self-attention of that time keep more memory alive than today's eager attention does, and
this file rebuilds them (our own code, written after reading the sources named):

* PyTorch <= 1.10 saved the *input* of softmax for backward, besides its output:
  tools/autograd/derivatives.yaml had `self: _softmax_backward_data(grad, result, dim, self)`,
  so `SoftmaxBackward` kept `self` alive although the kernels only read `output`
  (pytorch/pytorch issue #64000, "Softmax/logsoftmax use more memory for backward than
  needed"; fixed by PR #65242 / reland #66018 on 2021-10-01, after the 1.10 branch cut, so
  first released in 1.11, March 2022). For bert-large at sequence 512 that is one more
  B x 16 x 512 x 512 fp32 tensor (16 MiB per sample) per layer.
* BertSelfAttention (transformers v4.15.0, src/transformers/models/bert/modeling_bert.py)
  always added the extended attention mask: BertModel made `attention_mask = torch.ones(...)`
  when none was given, and `get_extended_attention_mask` (modeling_utils.py) turned it into
  `(1.0 - mask[:, None, None, :].to(self.dtype)) * -10000.0`, in the *parameters'* dtype
  (fp32 under AMP). So `scores + mask` is a new fp32 tensor - the one softmax saved - also
  with fp16=True (fp16 scores + fp32 mask promote to fp32; CUDA autocast's softmax then
  needs no cast).

Everything else of the 2022 layer (projections, `transpose_for_scores` views, scaling by
1/sqrt(d), dropout on the probabilities, context matmul, permute + contiguous) is the same
as today's eager attention and is kept as it is.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class SoftmaxSavingInput(torch.autograd.Function):
    """softmax whose backward node keeps its input, as `SoftmaxBackward` did in PyTorch <= 1.10
    (the gradient itself only uses the output, as the kernels did)."""

    @staticmethod
    def forward(ctx, x, dim):
        out = torch._softmax(x, dim, False)
        ctx.save_for_backward(x, out)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        return torch._softmax_backward_data(grad, out, ctx.dim, x.dtype), None


class SelfAttention2022(nn.Module):
    """transformers v4.15.0 BertSelfAttention.forward (absolute positions, no cross-attention,
    no head mask), reusing the projections and dropout of the module it replaces."""

    def __init__(self, replaced: nn.Module):
        super().__init__()
        self.query, self.key, self.value = replaced.query, replaced.key, replaced.value
        self.dropout = replaced.dropout
        self.num_attention_heads = replaced.num_attention_heads
        self.attention_head_size = replaced.attention_head_size

    def transpose_for_scores(self, x):
        return x.view(*x.shape[:-1], self.num_attention_heads,
                      self.attention_head_size).permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        b, t = hidden_states.shape[:2]
        query = self.transpose_for_scores(self.query(hidden_states))
        key = self.transpose_for_scores(self.key(hidden_states))
        value = self.transpose_for_scores(self.value(hidden_states))
        scores = torch.matmul(query, key.transpose(-1, -2))
        scores = scores / math.sqrt(self.attention_head_size)
        # the extended mask of an all-ones attention_mask, in the parameters' dtype
        ones = torch.ones(b, 1, 1, t, dtype=self.query.weight.dtype)
        scores = scores + (1.0 - ones) * -10000.0    # fp32, also when the scores are fp16
        probs = self.dropout(SoftmaxSavingInput.apply(scores, -1))
        context = torch.matmul(probs, value).permute(0, 2, 1, 3).contiguous()
        return context.view(b, t, -1), None


def use_2022_attention(model: nn.Module) -> nn.Module:
    """Replace every BertSelfAttention of `model` by SelfAttention2022 (in place)."""
    from transformers.models.bert.modeling_bert import BertAttention
    for module in model.modules():
        if isinstance(module, BertAttention):
            module.self = SelfAttention2022(module.self)
    return model
