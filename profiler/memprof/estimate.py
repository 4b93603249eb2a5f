"""Estimate the memory (and FLOPs) of one training step without running it: fake tensors.

    est = memprof.estimate.estimate_step(model, make_batch, loss_fn, batch_size=32,
                                         optimizer="adamw", precision="fp16",
                                         checkpointing="every")
    est.peak_allocated, est.peak_reserved, est.flops          # bytes, bytes, FLOPs
    est.profile.report()                                       # a Profile like a measured one

How it works
------------
The user's model is never touched. Its parameters and buffers are converted to fake tensors
(`FakeTensorMode.from_tensor`: shape, dtype and strides, no data) and the module structure is
deep-copied around them. One full training step - batch creation, forward, loss, backward,
optimizer step with its lazily created state, `zero_grad(set_to_none=True)` - then runs inside
`memprof.track()` under FakeTensorMode plus a TorchDispatchMode that, for every output of every
aten op, records a new storage with `memprof._C.record_external` and its death (a
`weakref.finalize` on the storage) as a free. So the estimate is a `Profile` on device "cuda"
whose events are the fake storages: categories, modules, ops, autograd nodes, peak, and all the
analyses and reports work on it. `Estimate.peak_reserved` replays the events through the
caching-allocator model (`memprof.allocator.simulate`: 512 B rounding, pools, segments).

What an estimate models, and what it does not
---------------------------------------------
* The optimizer is built on the fake parameters: "adamw", "adam", "sgd" (momentum 0.9) use
  `foreach=True`, the multi-tensor implementation PyTorch picks by default on CUDA (its
  `_foreach_sqrt` temporary of parameter size is part of the peak); or pass a factory
  `params -> torch.optim.Optimizer`. Frozen parameters (requires_grad=False, e.g. LoRA's base
  weights) get no gradient and no optimizer state, as in a real run.
* First step vs steady state: `peak_allocated` is the step as it ran (the first step: the
  optimizer state is created inside it). `steady_peak_allocated` replays the same events with
  the optimizer state existing from the start (every later step), and
  `accumulating_peak_allocated` additionally with the gradients existing from the start (the
  2nd..A-th micro-step of gradient accumulation). `recommend` uses the latter two.
* Mixed precision (precision="fp16" | "bf16"): AMP with fp32 master weights - autocast around
  forward and loss, backward outside it. This CPU build can only run CPU autocast, whose op
  lists differ from CUDA's, so the CUDA policy is emulated on top of it (`_CudaAutocast`, a
  TorchFunctionMode active while CPU autocast is enabled):
    - CPU autocast already runs matmul / linear / conv / bmm / baddbmm / SDPA in the low
      precision and caches the low-precision copies of the weights, as CUDA autocast does;
    - CUDA keeps softmax and log_softmax in fp32 *output* without copying the input: for fp16
      input that is `_softmax(x, dim, half_to_float=True)` - called here exactly (fp32 output
      saved for backward; the next matmul then saves its own fp16 copy); for bf16 input CUDA
      first casts to fp32, and so does the emulation;
    - CUDA runs layer_norm, group_norm, exp/log/pow/rsqrt..., the losses, norms and
      logsumexp in fp32 (casting the input: the fp32 copy is what layer_norm saves) - emulated
      by casting floating inputs to fp32 before the call; sum/prod/cumsum/cumprod get
      dtype=float32 (CUDA reduces in fp32 without a copy).
  GradScaler is not modelled: its unscale works in place and costs no memory.
* Checkpointing uses `memprof.checkpoint.apply` on the fake copy: the same code a user applies.
* FLOPs: `torch.utils.flop_counter`'s formulas (the registry FlopCounterMode uses; CPU fused
  attention counted like the CUDA kernels), applied by the recording mode to every op, so the
  recompute of checkpointed blocks is counted. FlopCounterMode itself is not used: its module
  tracker's backward hooks keep the recomputed tensors of checkpointed blocks alive until it
  exits, which inflated the estimated peak above the measured one.
* Python's cycle collector is off during the step (frees of cycle-held garbage would otherwise
  land at points that differ from run to run); an estimate is deterministic.
* Not modelled: memory that kernels allocate internally (cuBLAS / cuDNN workspaces, which the
  caching allocator serves on a GPU), the CUDA context (see `memprof.gpus`), non-parameter
  tensors that a model keeps as plain attributes (they are converted on use, not counted),
  data-dependent control flow that differs between fake and real values.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import time
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from . import _C
from .profile import (CAT_GRADIENTS, CAT_OPTIMIZER_STATE, PREEXISTING_THREAD, Profile)

__all__ = ["estimate_step", "Estimator", "Estimate", "BatchModel", "Prediction",
           "make_optimizer", "PRECISIONS", "OPTIMIZERS"]

PRECISIONS = ("fp32", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adam", "sgd", "none")
_LOW = {"fp16": torch.float16, "bf16": torch.bfloat16}
_FAKE_DEVICE = 1  # CUDA: storages of fake tensors stand for the GPU that is modelled


# ------------------------------------------------------------------------------ optimizers
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


# ------------------------------------------------------------------------------ recording
class _Session:
    """Storages known to one estimated step; finalizers record frees only while it is active."""

    def __init__(self):
        self.live: dict[int, int] = {}   # id(storage) -> nbytes recorded (0: pre-existing)
        self.active = True
        self.ops = 0


def _release(session: _Session, key: int) -> None:
    n = session.live.pop(key, None)
    if n and session.active:
        _C.record_external(key, -n, _FAKE_DEVICE, 0)


class _Recorder(TorchDispatchMode):
    """Records every new storage produced by an op (and its death) into the tracking session."""

    def __init__(self, session: _Session, count_flops: bool = True):
        super().__init__()
        self.session = session
        self.flops = 0
        self._registry = _flop_registry() if count_flops else {}

    def see(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        try:
            st = t.untyped_storage()
        except Exception:  # noqa: BLE001  (storage-less tensors)
            return
        key = id(st)
        live = self.session.live
        old = live.get(key)
        n = st.nbytes()
        if old is None:
            live[key] = n
            if n:
                _C.record_external(key, n, _FAKE_DEVICE, 0)
            weakref.finalize(st, _release, self.session, key)
        elif old and old != n:  # resized in place (out= ops, resize_)
            _C.record_external(key, -old, _FAKE_DEVICE, 0)
            _C.record_external(key, n, _FAKE_DEVICE, 0)
            live[key] = n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.session.ops += 1
        formula = self._registry.get(getattr(func, "_overloadpacket", None))
        if formula is not None:
            try:
                self.flops += int(formula(*args, **kwargs, out_val=out))
            except Exception:  # noqa: BLE001  (an unusual signature: count nothing)
                pass
        if isinstance(out, torch.Tensor):
            self.see(out)
        elif isinstance(out, (tuple, list)):
            for o in out:
                if isinstance(o, torch.Tensor):
                    self.see(o)
                elif isinstance(o, (tuple, list)):
                    for q in o:
                        self.see(q)
        return out


# ------------------------------------------------------------------------------ CUDA autocast
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


def _to_fp32(x):
    if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _with_mode(module: nn.Module, mode: TorchFunctionMode) -> None:
    """Make module.forward run under `mode` also when called outside it (the recompute of a
    checkpointed block in backward: backward itself runs with function modes popped)."""
    from torch.overrides import _get_current_function_mode_stack
    inner = module.forward

    def forward(*args, **kwargs):
        if any(m is mode for m in _get_current_function_mode_stack()):
            return inner(*args, **kwargs)
        with mode:
            return inner(*args, **kwargs)
    module.forward = forward


class _CudaAutocast(TorchFunctionMode):
    """While CPU autocast is on, make the ops CUDA autocast keeps in fp32 run in fp32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if (name in _SOFTMAX or name in _CUDA_FP32 or name in _CUDA_FP32_DTYPE) \
                and torch.is_autocast_enabled("cpu") and args:
            x = args[0]
            if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
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


# ------------------------------------------------------------------------------ FLOPs
_FLOP_REGISTRY = None


def _flop_registry() -> dict:
    """torch.utils.flop_counter's formulas (what FlopCounterMode counts), plus the CPU fused
    attention that SDPA runs on fake CPU tensors, counted like the CUDA kernels."""
    global _FLOP_REGISTRY
    if _FLOP_REGISTRY is None:
        from torch.utils.flop_counter import flop_registry, sdpa_backward_flop, sdpa_flop
        reg = dict(flop_registry)
        aten = torch.ops.aten
        if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
            reg[aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_flop
        if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
            reg[aten._scaled_dot_product_flash_attention_for_cpu_backward] = sdpa_backward_flop
        _FLOP_REGISTRY = reg
    return _FLOP_REGISTRY


# ------------------------------------------------------------------------------ results
def _stream(profile: Profile, variant: str = "first") -> tuple[np.ndarray, np.ndarray]:
    """(ptr, size) of the profile's allocations, reordered for a variant of the step:
    'first' as recorded; 'steady': optimizer state allocated before the step (every step after
    the first); 'accumulate': gradients too (micro-steps 2..A of gradient accumulation)."""
    mem = profile.memory
    size = profile._effective_size.copy()
    alloc_of = profile.alloc_of
    idx = np.arange(mem.size)
    token = np.where(size < 0, alloc_of, idx).astype(np.int64)
    token[token < 0] = idx[token < 0]
    ptr = token.astype(np.uint64) + np.uint64(1)
    if variant == "first":
        return ptr, size
    cats = profile.category
    move_cats = [CAT_OPTIMIZER_STATE] + ([CAT_GRADIENTS] if variant == "accumulate" else [])
    moved = (size > 0) & np.isin(cats, move_cats) & (mem["thread"] != PREEXISTING_THREAD)
    if variant not in ("steady", "accumulate"):
        raise ValueError(f"variant: expected 'first', 'steady' or 'accumulate', got {variant!r}")
    base = mem["thread"] == PREEXISTING_THREAD
    order = np.concatenate([idx[base], idx[moved], idx[~base & ~moved]])
    return ptr[order], size[order]


def _sim(ptr, size):
    from .allocator import simulate
    return simulate((ptr, size), return_timeline=False)


@dataclass
class Estimate:
    """One estimated training step. Byte counts are what the modelled GPU would hold."""
    profile: Profile
    batch_size: int
    precision: str
    checkpointing: str
    optimizer: str
    peak_allocated: int          # live bytes at the peak of the step as run (first step)
    peak_reserved: int           # caching-allocator model, same step
    steady_peak_allocated: int   # optimizer state existing from the start (steps >= 2)
    steady_peak_reserved: int
    accumulating_peak_allocated: int  # + gradients existing (micro-steps 2..A of accumulation)
    accumulating_peak_reserved: int
    flops: int                   # counted FLOPs of the step incl. recompute (flop_counter formulas)
    flops_by_phase: dict
    ops: int                     # aten ops dispatched (a stand-in for kernel launches)
    bytes_allocated: int         # bytes allocated during forward + backward (written at least once)
    buffers_bytes: int           # module buffers (BatchNorm statistics, ...), part of the peak
    params_bytes: int
    trainable_params: int
    wall_s: float                # time this estimate took on this machine
    by_category: dict = field(default_factory=dict)

    def peak(self, variant: str = "first", reserved: bool = False) -> int:
        return {("first", False): self.peak_allocated, ("first", True): self.peak_reserved,
                ("steady", False): self.steady_peak_allocated,
                ("steady", True): self.steady_peak_reserved,
                ("accumulate", False): self.accumulating_peak_allocated,
                ("accumulate", True): self.accumulating_peak_reserved}[(variant, reserved)]

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in (
            "batch_size", "precision", "checkpointing", "optimizer", "peak_allocated",
            "peak_reserved", "steady_peak_allocated", "steady_peak_reserved",
            "accumulating_peak_allocated", "accumulating_peak_reserved", "flops",
            "flops_by_phase", "ops", "bytes_allocated", "buffers_bytes", "params_bytes",
            "trainable_params", "wall_s", "by_category")} | {"estimated": True}

    def __repr__(self) -> str:
        g = 2 ** 30
        return (f"Estimate(batch_size={self.batch_size}, precision={self.precision!r}, "
                f"checkpointing={self.checkpointing!r}, peak_allocated={self.peak_allocated / g:.3f} "
                f"GiB, peak_reserved={self.peak_reserved / g:.3f} GiB, "
                f"flops={self.flops / 1e12:.3f} TFLOP, wall={self.wall_s:.2f} s)")


# ------------------------------------------------------------------------------ the estimator
def _split_batch(batch):
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
    else:
        inputs, targets = batch, None
    return inputs, targets


def _call_model(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _default_loss(outputs, targets):
    out = outputs
    if hasattr(out, "loss") and getattr(out, "loss") is not None:
        return out.loss
    if hasattr(out, "logits"):
        out = out.logits
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"loss: cannot make a loss of model output {type(outputs).__name__}; "
                        "pass loss=")
    if targets is None:
        return out.float().mean()
    if not targets.is_floating_point() and out.dim() >= 2:
        if out.dim() > 2 and targets.shape == out.shape[:-1]:  # token-level labels
            return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                     targets.reshape(-1))
        return torch.nn.functional.cross_entropy(out, targets)
    return torch.nn.functional.mse_loss(out, targets)


class Estimator:
    """Estimates steps of one model for any batch size, precision and checkpointing policy.

    The fake copy of the model is built once (parameters and buffers as fake tensors);
    every `step()` copies only the module structure around them."""

    def __init__(self, model: nn.Module, make_batch: Callable, loss_fn: Callable | None = None,
                 *, optimizer="adamw"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not callable(make_batch):
            raise TypeError(f"make_batch: expected a callable batch_size -> batch, got "
                            f"{type(make_batch).__name__}")
        from torch._subclasses.fake_tensor import FakeTensorMode
        self.make_batch = make_batch
        self.loss_fn = loss_fn or _default_loss
        self.optimizer = optimizer
        self.optimizer_name = optimizer if isinstance(optimizer, str) else \
            getattr(optimizer, "__name__", "custom")
        if isinstance(optimizer, str) and optimizer.lower() not in OPTIMIZERS:
            make_optimizer(optimizer, [])  # raises the one-line error
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.model_class = type(model).__name__
        memo: dict[int, Any] = {}
        for p in model.parameters():
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(self.fake_mode.from_tensor(p.detach()),
                                           requires_grad=p.requires_grad)
        for b in model.buffers():
            if id(b) not in memo:
                memo[id(b)] = self.fake_mode.from_tensor(b)
        # the template's own tensors map to themselves: per-step copies share them
        self._tensor_memo = {id(v): v for v in memo.values()}
        self._template = copy.deepcopy(model, memo)
        self.params_bytes = sum(p.untyped_storage().nbytes() for p in _unique_storages(
            self._template.parameters()))
        self.buffers_bytes = sum(b.untyped_storage().nbytes() for b in _unique_storages(
            self._template.buffers()))
        self.trainable_params = sum(p.numel() for p in self._template.parameters()
                                    if p.requires_grad)
        self.total_params = sum(p.numel() for p in self._template.parameters())
        self.training = model.training
        self._user_model = model
        self._user_module_names = {id(m): n for n, m in model.named_modules()}

    def _fresh_model(self) -> nn.Module:
        memo = {k: v for k, v in self._tensor_memo.items()}
        m = copy.deepcopy(self._template, memo)
        m.train(self.training)
        return m

    def step(self, batch_size: int, *, precision: str = "fp32", checkpointing: str = "none",
             blocks=None, count_flops: bool = True, simulate: bool = True) -> Estimate:
        """Estimate one training step at `batch_size` (see the module docstring)."""
        from .checkpoint import _resolve_blocks, parse_policy
        from .checkpoint import apply as apply_checkpointing
        from .track import track
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
        t0 = time.perf_counter()
        model = self._fresh_model()
        low = _LOW.get(precision)
        cuda_policy = _CudaAutocast() if low is not None else contextlib.nullcontext()
        kind = parse_policy(checkpointing or "none")[0]
        mods = []
        if kind != "none":
            _, mods = _resolve_blocks(model, _map_blocks(blocks, self, model))
            if low is not None:
                for m in mods:  # the recompute in backward runs under the emulation too
                    _with_mode(m, cuda_policy)
            apply_checkpointing(model, checkpointing, blocks=mods)
        # Selective checkpointing replays the forward's op sequence exactly; autocast's weight
        # cache breaks that when a block runs twice in one forward (DCAL's PWCA stream reuses
        # the SA blocks), on CUDA as here. So SAC + AMP runs with cache_enabled=False.
        autocast_cache = not (kind == "selective" and low is not None)
        opt = make_optimizer(self.optimizer, model.parameters())
        session = _Session()
        for b in _unique_storages(model.buffers()):
            session.live[id(b.untyped_storage())] = 0
        for p in _unique_storages(model.parameters()):
            session.live[id(p.untyped_storage())] = 0
        recorder = _Recorder(session, count_flops)
        loss_fn = self._rebind(self.loss_fn, model)
        make_batch = self._rebind(self.make_batch, model)
        # safety net: code that reaches the user's own parameters (a closure over the real
        # model) must not leave fake gradients on them
        user_grads = [(p, p.grad) for p in self._user_model.parameters()]
        amp = (lambda: torch.autocast("cpu", dtype=low, cache_enabled=autocast_cache)) \
            if low is not None else contextlib.nullcontext
        tracker = track(model, opt, analyses=[])
        error = None
        # Python's cycle collector frees garbage at points that differ from run to run: keep
        # it off during the step, so an estimate is deterministic (cycle-held tensors count
        # until the step ends, which is conservative).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
            warnings.filterwarnings("ignore", message=".*None of the inputs have requires_grad.*")
            try:
                with tracker:
                    try:  # errors are re-raised after the block: a failed estimate saves no file
                        phase_flops = self._run(model, opt, make_batch, loss_fn, batch_size,
                                                recorder, cuda_policy, amp)
                    except BaseException as e:  # noqa: BLE001
                        error = e
            finally:
                if gc_was_enabled:
                    gc.enable()
                session.active = False
                for m in mods:  # the forward wrappers close over their module: break the cycle
                    m.__dict__.pop("forward", None)
                for p in self._template.parameters():
                    p.grad = None
                for p, g in user_grads:
                    p.grad = g
        if error is not None:
            raise error
        prof = tracker.profile
        prof.meta.update({
            "estimated": True, "batch_size": int(batch_size), "precision": precision,
            "checkpointing": checkpointing or "none", "optimizer": self.optimizer_name,
            "autocast_cache": autocast_cache if low is not None else None,
            "model_class": self.model_class, "flops": int(sum(phase_flops.values())),
            "estimate_ops": session.ops,
        })
        est = self._finish(prof, int(batch_size), precision, checkpointing or "none",
                           phase_flops, session.ops, simulate)
        est.wall_s = time.perf_counter() - t0
        prof.meta["estimate_wall_s"] = est.wall_s
        return est

    def _run(self, model, opt, make_batch, loss_fn, batch_size, recorder, cuda_policy, amp):
        """The training step itself (inside track())."""
        # buffers exist on the GPU before the step: name them (category "other")
        for b in _unique_storages(model.buffers()):
            st = b.untyped_storage()
            if st.nbytes():
                _C.record_external(id(st), st.nbytes(), _FAKE_DEVICE, 0)
        with self.fake_mode, cuda_policy, recorder:
            batch = make_batch(int(batch_size))
            batch = tree_map(lambda t: self._adopt(t, recorder), batch)
            inputs, targets = _split_batch(batch)
            f0 = recorder.flops
            with amp():
                loss = loss_fn(_call_model(model, inputs), targets)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("loss: expected the loss function to return a scalar tensor, "
                                f"got {_describe(loss)}")
            f1 = recorder.flops
            loss.backward()
            f2 = recorder.flops
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                for p in model.parameters():
                    p.grad = None
            f3 = recorder.flops
            del loss
        return {"forward": f1 - f0, "backward": f2 - f1, "optimizer": f3 - f2}

    def _rebind(self, fn, model: nn.Module):
        """A method bound to (a submodule of) the user's model -> bound to the fake copy."""
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, nn.Module) and id(owner) in self._user_module_names:
            target = model.get_submodule(self._user_module_names[id(owner)])
            return types.MethodType(fn.__func__, target)
        return fn

    def _adopt(self, t, recorder):
        if not isinstance(t, torch.Tensor):
            return t
        from torch._subclasses.fake_tensor import is_fake
        if not is_fake(t):
            t = self.fake_mode.from_tensor(t)
        recorder.see(t)
        return t

    def _finish(self, prof: Profile, batch_size, precision, checkpointing, phase_flops, ops,
                simulate) -> Estimate:
        peaks = {}
        for variant in ("first", "steady", "accumulate"):
            ptr, size = _stream(prof, variant)
            alloc = int(np.cumsum(size).max()) if size.size else 0
            res = int(_sim(ptr, size).peak_reserved) if simulate and size.size else 0
            peaks[variant] = (alloc, res)
        mem = prof.memory
        size = mem["size"]
        compute = (size > 0) & np.isin(mem["phase"], (1, 2))
        return Estimate(
            profile=prof, batch_size=batch_size, precision=precision,
            checkpointing=checkpointing, optimizer=self.optimizer_name,
            peak_allocated=prof.peak, peak_reserved=peaks["first"][1],
            steady_peak_allocated=peaks["steady"][0], steady_peak_reserved=peaks["steady"][1],
            accumulating_peak_allocated=peaks["accumulate"][0],
            accumulating_peak_reserved=peaks["accumulate"][1],
            flops=int(sum(phase_flops.values())), flops_by_phase=dict(phase_flops), ops=ops,
            bytes_allocated=int(size[compute].sum()), buffers_bytes=self.buffers_bytes,
            params_bytes=self.params_bytes, trainable_params=self.trainable_params, wall_s=0.0,
            by_category=prof.breakdown("category"))


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _unique_storages(tensors):
    seen = set()
    for t in tensors:
        k = id(t.untyped_storage())
        if k not in seen:
            seen.add(k)
            yield t


def _map_blocks(blocks, estimator: Estimator, model: nn.Module):
    """blocks= given as modules of the user's model -> the same modules of the fake copy."""
    if blocks is None or isinstance(blocks, str):
        return blocks
    if isinstance(blocks, nn.Module):
        blocks = [blocks]
    names = estimator._user_module_names
    out = []
    fake_by_name = dict(model.named_modules())
    for b in blocks:
        name = names.get(id(b)) if names else None
        if name is None or name not in fake_by_name:
            raise ValueError("blocks: pass a qualified name (e.g. 'blocks') or modules of the "
                             "model given to the estimator")
        out.append(fake_by_name[name])
    return out


def estimate_step(model: nn.Module, make_batch: Callable, loss_fn: Callable | None = None, *,
                  batch_size: int, optimizer="adamw", precision: str = "fp32",
                  checkpointing: str = "none", blocks=None, count_flops: bool = True) -> Estimate:
    """Estimate one training step of `model` at `batch_size` without running it.

    make_batch(batch_size) -> (inputs, targets); inputs a tuple (model(*inputs)), a dict
    (model(**inputs)) or a tensor. loss_fn(outputs, targets) -> scalar (default: cross-entropy
    for integer targets, else MSE; or outputs.loss). optimizer: 'adamw' | 'adam' | 'sgd' |
    'none' or a factory params -> Optimizer. precision: 'fp32' | 'fp16' | 'bf16' (AMP, fp32
    master weights, CUDA autocast policy emulated). checkpointing: a memprof.checkpoint policy.
    """
    est = Estimator(model, make_batch, loss_fn, optimizer=optimizer)
    return est.step(batch_size, precision=precision, checkpointing=checkpointing, blocks=blocks,
                    count_flops=count_flops)


# ------------------------------------------------------------------------------ batch model
@dataclass
class Prediction:
    """A step predicted for any micro-batch from two estimates (an estimate too)."""
    batch_size: int
    accumulation: int
    precision: str
    checkpointing: str
    peak_allocated: int
    peak_reserved: int
    flops: int
    bytes_allocated: int
    ops: int
    exact: bool   # True: event sizes interpolated one by one (same op sequence in both runs)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _op_names(profile: Profile) -> list[str]:
    strings = profile.strings
    return [strings[i] if 0 <= i < len(strings) else "" for i in profile.memory["op"].tolist()]


class BatchModel:
    """Memory and FLOPs of a step as a function of the micro-batch, from estimates at two
    batch sizes. When both runs dispatched the same ops (the usual case), every allocation's
    size is affine in the batch and is interpolated one by one; the allocator model then
    replays the synthesized stream, so any batch is predicted (peak and reserved) without
    another fake run. Otherwise the peaks themselves are interpolated linearly."""

    def __init__(self, lo: Estimate, hi: Estimate):
        if lo.batch_size >= hi.batch_size:
            lo, hi = hi, lo
        if lo.batch_size == hi.batch_size:
            raise ValueError("BatchModel: need estimates at two different batch sizes")
        self.lo, self.hi = lo, hi
        self.precision, self.checkpointing = lo.precision, lo.checkpointing
        self._streams = {}
        pl, ph = lo.profile, hi.profile
        ml, mh = pl.memory, ph.memory
        self.exact = (ml.size == mh.size and _op_names(pl) == _op_names(ph)
                      and np.array_equal(np.sign(ml["size"]), np.sign(mh["size"]))
                      and np.array_equal(pl.alloc_of, ph.alloc_of)
                      and np.array_equal(pl.category, ph.category))
        if self.exact:
            for variant in ("steady", "accumulate", "first"):
                p1, s1 = _stream(pl, variant)
                _, s2 = _stream(ph, variant)
                self._streams[variant] = (p1, s1.astype(np.float64), s2.astype(np.float64))
        self._cache: dict = {}

    def _lerp(self, a, b, batch):
        t = (batch - self.lo.batch_size) / (self.hi.batch_size - self.lo.batch_size)
        return a + (b - a) * t

    def predict(self, batch_size: int, accumulation: int = 1, *, variant: str | None = None,
                reserved: bool = True) -> Prediction:
        variant = variant or ("steady" if accumulation <= 1 else "accumulate")
        key = (batch_size, accumulation, variant, reserved)
        if key in self._cache:
            return self._cache[key]
        b = int(batch_size)
        flops = int(round(self._lerp(self.lo.flops, self.hi.flops, b)))
        byts = int(round(self._lerp(self.lo.bytes_allocated, self.hi.bytes_allocated, b)))
        if self.exact:
            ptr, s1, s2 = self._streams[variant]
            size = np.rint(self._lerp(s1, s2, b)).astype(np.int64)
            alloc = int(np.cumsum(size).max())
            res = int(_sim(ptr, size).peak_reserved) if reserved else 0
        else:
            alloc = int(round(self._lerp(self.lo.peak(variant), self.hi.peak(variant), b)))
            res = int(round(self._lerp(self.lo.peak(variant, True),
                                       self.hi.peak(variant, True), b)))
        p = Prediction(batch_size=b, accumulation=accumulation, precision=self.precision,
                       checkpointing=self.checkpointing, peak_allocated=alloc,
                       peak_reserved=res, flops=flops, bytes_allocated=byts, ops=self.lo.ops,
                       exact=self.exact)
        self._cache[key] = p
        return p

    def max_batch(self, budget: int, accumulation: int = 1, limit: int = 1 << 16) -> int:
        """Largest micro-batch whose predicted reserved bytes stay within budget (0: none)."""
        def ok(b):
            return self.predict(b, accumulation).peak_reserved <= budget
        if not ok(1):
            return 0
        lo = 1
        # linear guess from the allocated peaks, then bracket
        slope = max(1.0, (self.hi.steady_peak_reserved - self.lo.steady_peak_reserved)
                    / (self.hi.batch_size - self.lo.batch_size))
        guess = int(max(1, min(limit, (budget - self.predict(1, accumulation).peak_reserved)
                               / slope + 1)))
        hi = guess
        if ok(hi):
            lo = hi
            hi = min(limit, max(hi + 1, int(hi * 1.25)))
            while hi < limit and ok(hi):
                lo, hi = hi, min(limit, hi * 2)
            if hi >= limit and ok(limit):
                return limit
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
        return lo

