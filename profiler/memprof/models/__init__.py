"""memprof.models: built-in workloads with random weights (nothing is downloaded).

    from memprof.models import build_model, MODELS, training_step
    model, make_batch, loss_fn = build_model("dcal-vit-tiny", attention_backend="fused")
    inputs, targets = make_batch(8)          # inputs is a tuple: call model(*inputs)
    loss = loss_fn(model(*inputs), targets)  # == training_step(model, make_batch(8), loss_fn)

Names (MODELS):
    mlp            784 -> 1024 -> 1024 -> 10 MLP, inputs (B, 784)
    resnet-tiny    CIFAR-style ResNet (16/32/64 channels, 2 blocks per stage), 32 x 32 images
    vit-tiny       ViT, 32 x 32 images, patch 4 (65 tokens), dim 192, depth 4, 3 heads
    vit-b16        ViT-B/16, 224 x 224 (197 tokens), dim 768, depth 12, 12 heads, 1000 classes
    dcal-vit-tiny  DCAL, 32 x 32 images, patch 8 (17 tokens), dim 64, depth 2, 2 heads, 10 classes
    dcal-vit-b16   DCAL on ViT-B/16 at 448 x 448 (785 tokens), 200 classes (CUB), 93.8 M parameters

`overrides` go to the model's constructor (e.g. depth=4, attention_backend="fused",
detach_history=False, img_size=384); `device=` / `dtype=` move the model after construction.
ViT and DCAL models take attention_backend="math" (default; materialises softmax(QK^T)) or
"fused" (memprof.tritonkernels.attention). DCAL batches are ((x1, x2), targets): x2 is the PWCA
distractor image (a rolled copy of x1 within the batch).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dcal import CONFIGS as DCAL_CONFIGS
from .dcal import DCAL, DCALConfig, UncertaintyWeightedLoss, attention_rollout
from .simple import MLP, ResNetTiny
from .vit import VisionTransformer

__all__ = ["build_model", "options", "check_options", "training_step", "MODELS", "Workload", "DCAL", "DCALConfig",
           "VisionTransformer", "MLP", "ResNetTiny", "UncertaintyWeightedLoss",
           "attention_rollout"]


class Workload(NamedTuple):
    """(model, make_batch, loss_fn); make_batch(batch_size) -> (inputs tuple, targets) on the
    model's current device; loss_fn(model(*inputs), targets) -> scalar loss."""
    model: nn.Module
    make_batch: Callable[[int], tuple[tuple[torch.Tensor, ...], torch.Tensor]]
    loss_fn: Callable[[object, torch.Tensor], torch.Tensor]


def _device_dtype(model: nn.Module):
    """Where batches go: the model's device, the CPU for a model built on meta (memprof's
    plans build the built-ins there and estimate on fake CPU tensors)."""
    p = next(model.parameters())
    return (torch.device("cpu") if p.device.type == "meta" else p.device), p.dtype


def _image_batch(model, num_classes: int, img: int, chans: int, pair: bool = False):
    def make_batch(batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        device, dtype = _device_dtype(model)
        x = torch.randn(batch_size, chans, img, img, device=device, dtype=dtype)
        y = torch.randint(0, num_classes, (batch_size,), device=device)
        if pair:  # PWCA distractor: another image of the batch
            return (x, torch.roll(x, 1, dims=0)), y
        return (x,), y
    return make_batch


def _ce(logits, targets):
    return F.cross_entropy(logits, targets)


def _mlp(**kw) -> Workload:
    model = MLP(**kw)

    def make_batch(batch_size: int):
        device, dtype = _device_dtype(model)
        x = torch.randn(batch_size, model.in_features, device=device, dtype=dtype)
        return (x,), torch.randint(0, model.num_classes, (batch_size,), device=device)
    return Workload(model, make_batch, _ce)


def _resnet_tiny(**kw) -> Workload:
    model = ResNetTiny(**kw)
    return Workload(model, _image_batch(model, model.num_classes, model.img_size, model.in_chans),
                    _ce)


_VIT_CONFIGS = {
    "vit-tiny": dict(img_size=32, patch_size=4, num_classes=10, dim=192, depth=4, heads=3),
    "vit-b16": dict(img_size=224, patch_size=16, num_classes=1000, dim=768, depth=12, heads=12),
}


def _vit(name):
    def build(**kw) -> Workload:
        model = VisionTransformer(**{**_VIT_CONFIGS[name], **kw})
        return Workload(model, _image_batch(model, model.num_classes, model.img_size,
                                            model.in_chans), _ce)
    return build


def _dcal(name):
    def build(**kw) -> Workload:
        model = DCAL(DCAL_CONFIGS[name], **kw)
        cfg = model.cfg
        return Workload(model, _image_batch(model, cfg.num_classes, cfg.img_size, cfg.in_chans,
                                            pair=True), model.compute_loss)
    return build


_BUILDERS = {
    "mlp": _mlp,
    "resnet-tiny": _resnet_tiny,
    "vit-tiny": _vit("vit-tiny"),
    "vit-b16": _vit("vit-b16"),
    "dcal-vit-tiny": _dcal("dcal-vit-tiny"),
    "dcal-vit-b16": _dcal("dcal-vit-b16"),
}

MODELS: tuple[str, ...] = tuple(_BUILDERS)

_CONSTRUCTORS = {"mlp": MLP, "resnet-tiny": ResNetTiny, "vit-tiny": VisionTransformer,
                 "vit-b16": VisionTransformer}


def options(name: str) -> dict[str, object]:
    """A built-in's options (the keywords build_model passes on) -> their defaults for it."""
    if name in DCAL_CONFIGS:
        cfg = DCAL_CONFIGS[name]
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    params = inspect.signature(_CONSTRUCTORS[name]).parameters.values()
    return {p.name: p.default for p in params if p.default is not p.empty} | \
        _VIT_CONFIGS.get(name, {})


def _fits(value, default) -> bool:
    """Whether `value` has the type of an option whose default is `default` (an int for a
    float too; a bool only for a bool)."""
    if default is None:
        return True
    want = type(default)
    if isinstance(value, bool) or want is bool:
        return isinstance(value, bool) and want is bool
    return isinstance(value, want) or (want is float and isinstance(value, int))


def check_options(name: str, overrides: dict, given_as: str | None = None) -> None:
    """Raise TypeError naming an option `name` does not take, or a value of another type
    than its default's (a constructor's own error named neither the options there are -
    "MLP.__init__() got an unexpected keyword argument 'foo'" - nor the option: "'str'
    object cannot be interpreted as an integer"). `given_as`: how the user passed them."""
    known = options(name)
    how = f" ({given_as})" if given_as else ""
    for key, value in overrides.items():
        if key not in known:
            raise TypeError(f"no option {key}{how}; expected some of "
                             f"{', '.join(sorted(known))}")
        default = known[key]
        if not _fits(value, default):
            kind = type(default).__name__
            article = "an" if kind[0] in "aeiou" else "a"
            raise TypeError(f"{key}={value!r}{how}: expected {article} {kind}, as its default "
                            f"{default!r}")


def build_model(name: str, *, device=None, dtype=None, **overrides) -> Workload:
    """Build a named workload with random weights; see the module docstring for the names."""
    if name not in _BUILDERS:
        raise ValueError(f"name: unknown model {name!r}; expected one of {list(MODELS)}")
    try:
        check_options(name, overrides)
        wl = _BUILDERS[name](**overrides)
    except TypeError as e:  # unknown keyword: say which model refused it
        raise TypeError(f"build_model({name!r}): {e}") from None
    if device is not None or dtype is not None:
        wl.model.to(device=device, dtype=dtype)
    return wl


def training_step(model: nn.Module, batch, loss_fn, optimizer=None) -> torch.Tensor:
    """One forward + backward (+ optimizer step when given) on batch = (inputs, targets)."""
    inputs, targets = batch
    loss = loss_fn(model(*inputs), targets)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()
