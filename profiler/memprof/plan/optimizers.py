"""The optimizer an estimate builds on the fake parameters, by name or from a factory.

The named ones use `foreach=True`, the multi-tensor implementation PyTorch picks by default on
CUDA (its `_foreach_sqrt` temporary of parameter size is part of the estimated peak); only
parameters that require a gradient get state, as in a real run.
"""
from __future__ import annotations

import torch

__all__ = ["OPTIMIZERS", "make_optimizer", "optimizer_kind"]

OPTIMIZERS = ("adamw", "adam", "sgd", "none")


def make_optimizer(spec, params) -> torch.optim.Optimizer | None:
    """spec: 'adamw' | 'adam' | 'sgd' | 'none' or a factory params -> Optimizer."""
    params = [p for p in params if p.requires_grad]
    if callable(spec) and not isinstance(spec, str):
        opt = spec(params)
        if opt is not None and not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer: the factory returned {type(opt).__name__}, expected a "
                            "torch.optim.Optimizer")
        return opt
    name = str(spec).lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, foreach=True)
    if name == "none":
        return None
    raise ValueError(f"optimizer: unknown optimizer {spec!r}; expected one of {list(OPTIMIZERS)} "
                     "or a factory params -> torch.optim.Optimizer")


def optimizer_kind(spec) -> str:
    """'adam' for Adam-style (adaptive) optimizers, 'sgd' otherwise (for LR-scaling advice)."""
    name = spec if isinstance(spec, str) else getattr(spec, "__name__", type(spec).__name__)
    name = str(name).lower()
    return "adam" if any(k in name for k in ("adam", "lamb", "lion", "rmsprop", "adagrad",
                                             "adafactor")) else "sgd"
