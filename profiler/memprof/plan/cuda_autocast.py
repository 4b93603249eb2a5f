"""CUDA autocast's op policy, emulated on top of CPU autocast (what an fp16/bf16 estimate runs).

This CPU build of torch can only run CPU autocast, whose op lists differ from CUDA's, so an
estimate of a mixed-precision step runs CPU autocast with `CudaAutocast` (a TorchFunctionMode
active while CPU autocast is enabled) on top:

* CPU autocast already runs matmul / linear / conv / bmm / baddbmm / SDPA in the low precision
  and caches the low-precision copies of the weights, as CUDA autocast does;
* CUDA keeps softmax and log_softmax in fp32 *output* without copying the input: for fp16 input
  that is `_softmax(x, dim, half_to_float=True)` - called here exactly (fp32 output saved for
  backward; the next matmul then saves its own fp16 copy); for bf16 input CUDA first casts to
  fp32, and so does the emulation;
* CUDA runs layer_norm, group_norm, exp/log/pow/rsqrt..., the losses, norms and logsumexp in
  fp32 (casting the input: the fp32 copy is what layer_norm saves) - emulated by casting
  floating inputs to fp32 before the call; sum/prod/cumsum/cumprod get dtype=float32 (CUDA
  reduces in fp32 without a copy).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

__all__ = ["LOW_PRECISION_DTYPES", "CudaAutocast", "run_under"]

#: the AMP precisions and the autocast dtype of each (fp32 master weights in both)
LOW_PRECISION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# Ops that CUDA autocast runs in fp32 (casting their floating inputs) but CPU autocast leaves in
# the input's (low) precision. Names as torch functions / Tensor methods spell them.
_CUDA_FP32 = frozenset((
    "layer_norm", "group_norm", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
    "rsqrt", "acos", "asin", "cosh", "erfinv", "sinh", "tan", "pow", "__pow__", "__rpow__",
    "softplus", "cosine_similarity", "nll_loss", "kl_div", "l1_loss", "smooth_l1_loss",
    "huber_loss", "mse_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist",
    "renorm", "logsumexp", "norm", "poisson_nll_loss", "cosine_embedding_loss",
    "hinge_embedding_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss",
    "triplet_margin_loss", "multi_margin_loss", "frobenius_norm", "nuclear_norm",
    "cross_entropy"))
# fp32 output via a dtype argument: no copy of the input on CUDA
_CUDA_FP32_DTYPE = frozenset(("sum", "prod", "cumsum", "cumprod"))
_SOFTMAX = {"softmax": torch._softmax, "log_softmax": torch._log_softmax}


def _is_low(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16)


def _to_fp32(x):
    return x.float() if _is_low(x) else x


def run_under(module: nn.Module, mode: TorchFunctionMode) -> None:
    """Make module.forward run under `mode` also when called outside it (the recompute of a
    checkpointed block in backward: backward itself runs with function modes popped)."""
    from torch.overrides import _get_current_function_mode_stack
    inner = module.forward

    def forward(*args, **kwargs):
        if any(m is mode for m in _get_current_function_mode_stack()):
            return inner(*args, **kwargs)
        with mode:
            return inner(*args, **kwargs)
    # its signature stays readable: checkpointing finds the cache argument by position in it
    functools.update_wrapper(forward, inner)
    module.forward = forward


class CudaAutocast(TorchFunctionMode):
    """While CPU autocast is on, make the ops CUDA autocast keeps in fp32 run in fp32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if (name in _SOFTMAX or name in _CUDA_FP32 or name in _CUDA_FP32_DTYPE) \
                and torch.is_autocast_enabled("cpu") and args and _is_low(args[0]):
            x = args[0]
            if name in _SOFTMAX:
                dim = args[1] if len(args) > 1 else kwargs.get("dim")
                if isinstance(dim, int) and kwargs.get("dtype") is None and len(args) <= 2:
                    if x.dtype == torch.float16:  # CUDA: fused half -> float softmax
                        return _SOFTMAX[name](x, dim, True)
                    return _SOFTMAX[name](x.float(), dim, False)
            elif name in _CUDA_FP32_DTYPE:
                if "dtype" not in kwargs:
                    return func(*args, **kwargs, dtype=torch.float32)
            else:
                args = tuple(_to_fp32(a) for a in args)
                kwargs = {k: _to_fp32(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)
