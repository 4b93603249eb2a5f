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
a recording session (`_recorded`) under FakeTensorMode plus the recording mode of
`memprof.plan.fake_step`, which records every storage an aten op creates and its death. So the
estimate is a `Profile` on device "cuda" whose events are the fake storages: categories,
modules, ops, autograd nodes, peak, and all the analyses and reports work on it.
`Estimate.peak_reserved` replays the events through the caching-allocator model
(`memprof.plan.allocator.simulate`: 512 B rounding, pools, segments).

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
  2nd..A-th micro-step of gradient accumulation); see `memprof.plan.streams`. `recommend` uses
  the latter two.
* Mixed precision (precision="fp16" | "bf16"): AMP with fp32 master weights - autocast around
  forward and loss, backward outside it, with CUDA autocast's op policy emulated on top of CPU
  autocast (`memprof.plan.cuda_autocast`). GradScaler is not modelled: its unscale works in
  place and costs no memory. A model whose weights are half precision follows
  `memprof.plan.precision`: trained in its own dtype with no autocast when every trained
  parameter is of it, under autocast when trained fp32 parameters sit beside it (LoRA), and
  converted first when the precision asked for is the other half dtype (bf16 weights -> fp16
  on a GPU without bf16: what the plan's code does, batch tensors of the old dtype included).
* Checkpointing uses `memprof.checkpoint.apply` on the fake copy: the same code a user applies.
* FLOPs: `torch.utils.flop_counter`'s formulas, applied by the recording mode to every op, so
  the recompute of checkpointed blocks is counted (see `memprof.plan.fake_step`).
* Python's cycle collector is off during the step (frees of cycle-held garbage would otherwise
  land at points that differ from run to run); an estimate is deterministic.
* Kernels: with `gpu=` (what `recommend` passes) the ops whose CUDA kernels keep other memory
  than the CPU's - dropout's bool mask, the SDPA backend the GPU runs (flash / memory-efficient
  / math) and what it saves, cuBLAS workspaces, flash backward's scratch - are modelled by the
  rules of `memprof.plan.cuda_kernels`; `Estimate.kernel_rules` counts the rules applied.
  Without `gpu=` the step runs this process's CPU kernels (what `measure_step` measures).
* Not modelled: cuDNN convolution workspaces, the CUDA context (see `memprof.plan.gpus`), non-parameter
  tensors that a model keeps as plain attributes (they are converted on use, not counted),
  data-dependent control flow that differs between fake and real values.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import logging
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from ..profile import Profile
from ..record.events import PHASE_BACKWARD, PHASE_FORWARD
from ..record.session import Session
from ..run import Run
from .amp_wrapper import unwrapped_forward
from .checkpoint import apply as apply_checkpointing
from .checkpoint import parse_policy, resolve_blocks
from .cuda_autocast import LOW_PRECISION_DTYPES, CudaAutocast, run_under
from .cuda_kernels import CudaKernels, KernelScratch, target_for
from .default_loss import default_loss, loss_rule
from .fake_op_cache import FakeOpCache
from .fake_step import RecordingMode, StepStorages, record_buffers, unique_storages
from .meta_build import fake_like
from .optimizers import OPTIMIZERS, make_optimizer, optimizer_kind
from .own_autocast import OwnAutocast
from .own_checkpointing import OwnCheckpoints
from .precision import ESTIMATE_PRECISIONS, model_precision, training
from .recompute_modes import recompute_under
from .streams import (VARIANTS, free_tokens, live_by_category, reserved_peak, step_order,
                      stream_pointers)

__all__ = ["estimate_step", "measure_step", "Estimator", "Estimate", "make_optimizer",
           "optimizer_kind", "ESTIMATE_PRECISIONS", "OPTIMIZERS"]

# ------------------------------------------------------------------------------ results
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
    ops: int                     # kernels a micro-step launches: forward + backward's ops
    #                              but views, device queries and bare allocations
    bytes_allocated: int         # bytes allocated during forward + backward (written at least once)
    buffers_bytes: int           # module buffers (BatchNorm statistics, ...), part of the peak
    params_bytes: int
    trainable_params: int        # parameters the step gave a gradient (an EMA copy gets none)
    wall_s: float                # time this estimate took on this machine
    # live bytes per category at the steady-state peak (steps >= 2, as steady_peak_*: the
    # optimizer state exists); first_by_category: at the first step's peak, where an
    # optimizer creating its state lazily (AdamW) has none yet
    by_category: dict = field(default_factory=dict)
    first_by_category: dict = field(default_factory=dict)
    kernel_rules: dict = field(default_factory=dict)  # CUDA kernel rules applied -> count
    own_checkpoints: int = 0     # checkpoints the model's forward opened itself (own_checkpointing)
    policy_blocks: int = 0       # blocks memprof's policy wrapped (not those left to the model)
    loss_rule: dict | None = None  # the rule default_loss applied (None: a given loss)
    own_autocast: dict | None = None  # the autocast the model's forward enters (own_autocast)

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
            "trainable_params", "wall_s", "by_category", "first_by_category",
            "kernel_rules")} | {"estimated": True}

    def __repr__(self) -> str:
        g = 2 ** 30
        return (f"Estimate(batch_size={self.batch_size}, precision={self.precision!r}, "
                f"checkpointing={self.checkpointing!r}, peak_allocated={self.peak_allocated / g:.3f} "
                f"GiB, peak_reserved={self.peak_reserved / g:.3f} GiB, "
                f"flops={self.flops / 1e12:.3f} TFLOP, wall={self.wall_s:.2f} s)")


# ------------------------------------------------------------------------------ batches, losses
def split_batch(batch):
    """A batch -> (inputs, targets); a batch that is not a pair is all inputs (targets None)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
    else:
        inputs, targets = batch, None
    return inputs, targets


def call_model(model, inputs):
    """model(**inputs), model(*inputs) or model(inputs), by the type of the inputs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@contextlib.contextmanager
def quiet_fake_tensor_log():
    """FakeTensorMode logs ~40 lines of traceback for an op that fails (a batch the model
    rejects) before raising it; the error reaches the user as its one line."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _check_step_args(batch_size, precision) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if precision not in ESTIMATE_PRECISIONS:
        raise ValueError(f"precision: expected one of {list(ESTIMATE_PRECISIONS)}, got "
                         f"{precision!r}")


# ------------------------------------------------------------------------------ recording
def _recorded(model: nn.Module, optimizer):
    """The recording session of one step -> (a context manager around the step, a function
    that returns the step's Profile once the block has exited).

    Estimates (and `measure_step`) record with the core alone: the same native hook, module
    scope, steps and snapshots as memprof.track(), but no throughput or health recorders and
    no analyses."""
    session = Session(model, optimizer, recorders=())
    return session, lambda: Profile(Run.from_session(session))


# ------------------------------------------------------------------------------ the estimator
class Estimator:
    """Estimates steps of one model for any batch size, precision and checkpointing policy.

    The fake copy of the model is built once (parameters and buffers as fake tensors);
    every `step()` copies only the module structure around them."""

    def __init__(self, model: nn.Module, make_batch: Callable, loss_fn: Callable | None = None,
                 *, optimizer="adamw", gpu=None, param_dtype=None, convert=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not callable(make_batch):
            raise TypeError(f"make_batch: expected a callable batch_size -> batch, got "
                            f"{type(make_batch).__name__}")
        from torch._subclasses.fake_tensor import FakeTensorMode
        self.make_batch = make_batch
        self.loss_fn = loss_fn or default_loss
        self.optimizer = optimizer
        self.optimizer_name = optimizer if isinstance(optimizer, str) else \
            getattr(optimizer, "__name__", "custom")
        if isinstance(optimizer, str) and optimizer.lower() not in OPTIMIZERS:
            make_optimizer(optimizer, [])  # raises the one-line error
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.op_cache = FakeOpCache(self.fake_mode)
        # gpu: a memprof.plan.gpus entry (or name) -> its CUDA kernels' memory is modelled
        # (memprof.plan.cuda_kernels); None -> the CPU kernels this process runs (what
        # measure_step measures here)
        if isinstance(gpu, str):
            from .gpus import lookup
            gpu = lookup(gpu)
        self.kernel_target = target_for(gpu)
        self.model_class = type(model).__name__
        # the precisions of the user's weights decide autocast (memprof.plan.precision)
        self.model_precision = model_precision(model)
        self._init = ((model, make_batch, loss_fn), {"optimizer": optimizer, "gpu": gpu,
                                                      "param_dtype": param_dtype})
        self._converted: dict[str, Estimator] = {}
        self._convert_dtypes = convert
        memo: dict[int, Any] = {}
        for p in model.parameters():
            if id(p) not in memo:
                t = fake_like(self.fake_mode, p.detach())
                if param_dtype is not None and t.is_floating_point():
                    # half-precision working weights (memprof.plan.distributed's ZeRO layout)
                    with self.fake_mode:
                        t = t.to(param_dtype)
                memo[id(p)] = nn.Parameter(self._convert(t, convert),
                                           requires_grad=p.requires_grad)
        for b in model.buffers():   # meta-built modules too (memprof.plan.meta_build)
            if id(b) not in memo:
                memo[id(b)] = self._convert(fake_like(self.fake_mode, b), convert)
        # the template's own tensors map to themselves: per-step copies share them
        self._tensor_memo = {id(v): v for v in memo.values()}
        with unwrapped_forward(model):   # the precision is the estimate's, not accelerate's
            self._template = copy.deepcopy(model, memo)
        if convert is not None:   # what it trains is the converted model
            self.model_precision = model_precision(self._template)
        self.params_bytes = sum(p.untyped_storage().nbytes() for p in unique_storages(
            self._template.parameters()))
        self.buffers_bytes = sum(b.untyped_storage().nbytes() for b in unique_storages(
            self._template.buffers()))
        self.trainable_params = sum(p.numel() for p in self._template.parameters()
                                    if p.requires_grad)
        self.total_params = sum(p.numel() for p in self._template.parameters())
        self.training = model.training
        self._user_model = model
        self._user_module_names = {id(m): n for n, m in model.named_modules()}

    def _convert(self, t: torch.Tensor, convert) -> torch.Tensor:
        """`t` as the printed code's conversion leaves it: convert = (from dtype, to dtype)
        converts the tensors of the first (bf16 weights on a GPU without bf16 -> fp16)."""
        if convert is None or t.dtype != convert[0]:
            return t
        with self.fake_mode:
            return t.to(convert[1])

    def _as_trained(self, precision: str) -> Estimator:
        """The estimator whose fake weights are what `precision` trains: this one, or one
        built with the model's half weights converted (memprof.plan.precision)."""
        dtypes = training(self.model_precision, precision).convert_dtypes
        if dtypes is None:
            return self
        if precision not in self._converted:
            args, kw = self._init
            self._converted[precision] = Estimator(*args, **kw, convert=dtypes)
        return self._converted[precision]

    def _fresh_model(self) -> nn.Module:
        memo = {k: v for k, v in self._tensor_memo.items()}
        m = copy.deepcopy(self._template, memo)
        m.train(self.training)
        return m

    def step(self, batch_size: int, *, precision: str = "fp32", checkpointing: str = "none",
             blocks=None, count_flops: bool = True, simulate: bool = True) -> Estimate:
        """Estimate one training step at `batch_size` (see the module docstring)."""
        _check_step_args(batch_size, precision)
        trained = self._as_trained(precision)
        if trained is not self:
            return trained.step(batch_size, precision=precision, checkpointing=checkpointing,
                                blocks=blocks, count_flops=count_flops, simulate=simulate)
        checkpointing = checkpointing or "none"
        t0 = time.perf_counter()
        model = self._fresh_model()
        # autocast unless the model trains in the precision as built (half weights all through)
        low = LOW_PRECISION_DTYPES.get(precision) \
            if training(self.model_precision, precision).autocast else None
        cuda_policy = CudaAutocast() if low is not None else contextlib.nullcontext()
        kernels = CudaKernels(self.kernel_target) if self.kernel_target else None
        kind, mods, wrapped = self._checkpoint(model, checkpointing, blocks,
                                      cuda_policy if low is not None else None, kernels)
        # Selective checkpointing replays the forward's op sequence exactly; autocast's weight
        # cache breaks that when a block runs twice in one forward (DCAL's PWCA stream reuses
        # the SA blocks), on CUDA as here. So SAC + AMP runs with cache_enabled=False.
        autocast_cache = not (kind == "selective" and low is not None)
        amp = (lambda: torch.autocast("cpu", dtype=low, cache_enabled=autocast_cache)) \
            if low is not None else contextlib.nullcontext
        opt = make_optimizer(self.optimizer, model.parameters())
        storages = StepStorages(model)
        recorder = RecordingMode(storages, count_flops, scratch=KernelScratch(
            self.kernel_target) if kernels is not None else None, op_cache=self.op_cache)
        rule: dict = {}
        loss_fn = _noting_rule(self._rebind(self.loss_fn, model), rule)
        make_batch = self._rebind(self.make_batch, model)
        own, own_amp = OwnCheckpoints(), OwnAutocast(model)
        prof, phase_flops = self._record(
            model, opt, storages, mods,
            lambda: self._run(model, opt, make_batch, loss_fn, batch_size, recorder,
                              cuda_policy, amp, kernels or contextlib.nullcontext(),
                              (own, own_amp)))
        prof.meta.update({
            "estimated": True, "batch_size": int(batch_size), "precision": precision,
            "checkpointing": checkpointing, "optimizer": self.optimizer_name,
            "autocast_cache": autocast_cache if low is not None else None,
            "model_class": self.model_class, "flops": int(sum(phase_flops.values())),
            "estimate_ops": storages.ops,
            "kernels": self.kernel_target.name if kernels is not None else "cpu",
            "kernel_rules": dict(kernels.applied) if kernels is not None else {},
            "own_checkpoints": own.count, "policy_blocks": wrapped,
        })
        est = self._finish(prof, int(batch_size), precision, checkpointing, phase_flops,
                           storages.pass_kernels, simulate)
        est.wall_s = time.perf_counter() - t0
        est.kernel_rules = dict(prof.meta["kernel_rules"])
        est.loss_rule, est.own_checkpoints, est.policy_blocks = rule or None, own.count, wrapped
        est.own_autocast = own_amp.entered
        prof.meta["estimate_wall_s"] = est.wall_s
        return est

    def _checkpoint(self, model, checkpointing, blocks, mode,
                    kernels=None) -> tuple[str, list[nn.Module], int]:
        """Apply the policy to the fake copy -> (policy kind, its candidate blocks, how many
        it checkpointed: blocks that checkpoint themselves are left to the model). With an
        AMP `mode` or CUDA `kernels`, the recompute of a block in backward runs under them
        too."""
        kind = parse_policy(checkpointing)[0]
        if kind == "none":
            return kind, [], 0
        _, mods = resolve_blocks(model, _map_blocks(blocks, self, model))
        for m in mods:
            for under in (kernels, mode):   # mode outermost, as in the step itself
                if under is not None:
                    run_under(m, under)
        with warnings.catch_warnings():   # the plan says it (own_checkpointing.skip_reason)
            warnings.filterwarnings("ignore", message=".*blocks .* checkpoint themselves")
            handle = apply_checkpointing(model, checkpointing, blocks=mods)
        return kind, mods, len(handle.wrapped)

    def _record(self, model, opt, storages: StepStorages, mods, run) -> tuple[Profile, dict]:
        """run() inside a recording session -> (its Profile, FLOPs per phase). Errors are
        re-raised after the session: a failed estimate saves no file."""
        # safety net: code that reaches the user's own parameters (a closure over the real
        # model) must not leave fake gradients on them
        user_grads = [(p, p.grad) for p in self._user_model.parameters()]
        recording, recorded_profile = _recorded(model, opt)
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
                with recording:
                    try:
                        phase_flops = run()
                    except BaseException as e:  # noqa: BLE001
                        error = e
            finally:
                if gc_was_enabled:
                    gc.enable()
                storages.active = False
                for m in mods:  # the forward wrappers close over their module: break the cycle
                    m.__dict__.pop("forward", None)
                for p in self._template.parameters():
                    p.grad = None
                for p, g in user_grads:
                    p.grad = g
        if error is not None:
            raise error
        return recorded_profile(), phase_flops

    def _run(self, model, opt, make_batch, loss_fn, batch_size, recorder, cuda_policy, amp,
             kernels, own):
        """The training step itself (inside the recording session); `own`: what notes the
        checkpoints and the autocast the model's forward opens itself."""
        record_buffers(model)
        recorder.record_persistent(model)
        # the model's own checkpoints recompute under the same rules as its forward
        recompute = recompute_under(cuda_policy, kernels)
        with self.fake_mode, cuda_policy, kernels, recorder, quiet_fake_tensor_log(), recompute:
            batch = make_batch(int(batch_size))
            batch = tree_map(lambda t: self._adopt(t, recorder), batch)
            inputs, targets = split_batch(batch)
            f0, k0 = recorder.flops, recorder.storages.kernels
            with amp(), own[0], own[1]:
                loss = loss_fn(call_model(model, inputs), targets)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("loss: expected the loss function to return a scalar tensor, "
                                f"got {_describe(loss)}")
            f1 = recorder.flops
            loss.backward()
            f2 = recorder.flops
            self._step_trained = sum(p.numel() for p in model.parameters() if p.grad is not None)
            # the kernels one micro-step launches (the optimizer's, and its first step's
            # state, are once per step: not part of the per-launch floor)
            recorder.storages.pass_kernels = recorder.storages.kernels - k0
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
        t = self._convert(t, self._convert_dtypes)   # the converted model's inputs: its dtype
        recorder.see(t)
        return t

    def _finish(self, prof: Profile, batch_size, precision, checkpointing, phase_flops, ops,
                simulate) -> Estimate:
        peaks, at_peak = {}, {}
        tokens = free_tokens(prof)
        ptrs, sizes, cats = stream_pointers(tokens), prof.effective_size, prof.category
        for variant in VARIANTS:
            order = step_order(prof, variant, tokens)
            ptr, size = ptrs[order], sizes[order]
            live = np.cumsum(size)
            top = int(np.argmax(live)) if size.size else -1
            alloc = int(live[top]) if size.size else 0
            res = reserved_peak(ptr, size) if simulate and size.size else 0
            peaks[variant] = (alloc, res)
            at_peak[variant] = live_by_category(size[:top + 1], cats[order][:top + 1])
        mem = prof.memory
        size = mem["size"]
        compute = (size > 0) & np.isin(mem["phase"], (PHASE_FORWARD, PHASE_BACKWARD))
        return Estimate(
            profile=prof, batch_size=batch_size, precision=precision,
            checkpointing=checkpointing, optimizer=self.optimizer_name,
            peak_allocated=prof.peak, peak_reserved=peaks["first"][1],
            steady_peak_allocated=peaks["steady"][0], steady_peak_reserved=peaks["steady"][1],
            accumulating_peak_allocated=peaks["accumulate"][0],
            accumulating_peak_reserved=peaks["accumulate"][1],
            flops=int(sum(phase_flops.values())), flops_by_phase=dict(phase_flops), ops=ops,
            bytes_allocated=int(size[compute].sum()), buffers_bytes=self.buffers_bytes,
            params_bytes=self.params_bytes, trainable_params=self._step_trained, wall_s=0.0,
            by_category=at_peak["steady"], first_by_category=at_peak["first"])


def _noting_rule(loss_fn, rule: dict):
    """`default_loss` that also notes which of its rules it applied into `rule` (for the
    plan's code: no separate forward needed to find out); any other loss as it is."""
    if loss_fn is not default_loss:
        return loss_fn

    def loss(outputs, targets):
        rule.update(loss_rule(outputs, targets))
        return default_loss(outputs, targets)
    return loss


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
                  checkpointing: str = "none", blocks=None, count_flops: bool = True,
                  gpu=None) -> Estimate:
    """Estimate one training step of `model` at `batch_size` without running it.

    make_batch(batch_size) -> (inputs, targets); inputs a tuple (model(*inputs)), a dict
    (model(**inputs)) or a tensor. loss_fn(outputs, targets) -> scalar (default: cross-entropy
    for integer targets, else MSE; or outputs.loss). optimizer: 'adamw' | 'adam' | 'sgd' |
    'none' or a factory params -> Optimizer. precision: 'fp32' | 'fp16' | 'bf16' (AMP, fp32
    master weights, CUDA autocast policy emulated). checkpointing: a memprof.checkpoint policy.
    gpu: a GPU name or entry -> what its CUDA kernels allocate and save is modelled
    (`memprof.plan.cuda_kernels`); None: the CPU kernels of this process.
    """
    est = Estimator(model, make_batch, loss_fn, optimizer=optimizer, gpu=gpu)
    return est.step(batch_size, precision=precision, checkpointing=checkpointing, blocks=blocks,
                    count_flops=count_flops)


def measure_step(model: nn.Module, make_batch: Callable, loss_fn: Callable, batch_size: int, *,
                 optimizer="adamw", checkpointing: str = "none") -> tuple[Profile, float]:
    """Run for real (on the model's device) the fp32 step that `estimate_step` predicts,
    recorded the way an estimate is -> (its Profile, wall seconds). What estimates are checked
    against (tests, benchmarks/estimate_accuracy.py); the model is left as it was."""
    handle = apply_checkpointing(model, checkpointing)
    try:
        opt = make_optimizer(optimizer, model.parameters())
        torch.manual_seed(0)
        t = time.perf_counter()
        recording, recorded_profile = _recorded(model, opt)
        with recording:
            inputs, targets = make_batch(batch_size)
            loss = loss_fn(call_model(model, inputs), targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss, inputs, targets
        wall = time.perf_counter() - t
    finally:
        handle.remove()
    return recorded_profile(), wall
