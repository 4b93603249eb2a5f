"""`memprof.recommend`: what fits on a GPU you may not have, and how fast it would run (estimated).

    plan = memprof.recommend(model="dcal-vit-b16", gpu="v100-16gb", effective_batch=16)
    plan.best                      # Option(micro_batch, accumulation, checkpointing, precision, ...)
    plan.max_micro_batch(precision="fp16", checkpointing="every")
    plan.predict(6, precision="fp16", checkpointing="every")
    print(plan.code())             # how to apply the best option

    memprof recommend --gpu v100-16gb --model dcal-vit-b16 --effective-batch 16

Every number is an ESTIMATE (fake-tensor steps, `memprof.plan.estimate`), never a measurement:

* For each precision the GPU supports x checkpointing policy, one training step is estimated
  at two small micro-batches (2 and 4). Every allocation of the step is affine in the batch, so
  the two event streams give the stream at any micro-batch exactly when both runs dispatched the
  same ops (checked; otherwise peaks are interpolated linearly: `memprof.plan.batch_model`).
  The caching-allocator model replays the synthesized stream for the reserved bytes. When
  the peaks are interpolated, the largest micro-batch that fits is confirmed by estimating a
  step at that boundary (and the model refitted if it disagrees). An exact batch model
  predicts the stream an estimate would give, byte for byte (checked on built-in and Hugging
  Face models), so only the option the plan recommends is confirmed then: an estimate at its
  micro-batch, unless a fit estimate already ran there.
* The precision x policy combinations are independent fake steps: they run in forked worker
  processes, one per usable core (`memprof.plan.combos`, `memprof.plan.parallel`;
  `workers=1` keeps them here).
* Memory is the steady state: optimizer state exists from the start of the step, and with
  gradient accumulation (accumulation > 1) the gradients too (micro-steps 2..A).
* Fits: predicted reserved bytes <= `memprof.plan.gpus.usable_bytes(gpu)` = total memory - CUDA
  context and kernels (`gpus.DEFAULT_OVERHEAD_BYTES`) - a margin (`gpus.FIT_MARGIN`, 5 % of
  the total) for what the estimate does not see (cuDNN convolution workspaces, NCCL buffers,
  ...: `cuda_kernels.NOT_MODELLED`; cuBLAS workspaces and attention scratch are modelled).
* Throughput: the time model of `memprof.plan.timing`; samples/s = effective batch /
  (accumulation x micro-step time + optimizer-step time), on N GPUs the global batch over the
  rank's step time with its exposed communication (`memprof.plan.distributed`). Its
  utilisation figures are stated assumptions, not measurements: use the ranking, and measure
  the chosen configuration (memprof.track + memprof.throughput).
* Learning rate and warmup: `memprof.plan.advice`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

from .advice import lr_advice, warmup_advice
from .batch_model import SEARCH_LIMIT
from .checkpoint import find_blocks, parse_policy, policies_for, resolve_blocks
from .codegen import plan_code
from .combos import FIT_BATCHES, Combination, Search
from .errors import PlanInputError, names
from .cuda_kernels import NOT_MODELLED, cublas_workspace_bytes
from .distributed import Distributed, RankEstimator
from .estimate import ESTIMATE_PRECISIONS, Estimator
from .gpus import DEFAULT_OVERHEAD_BYTES, FIT_MARGIN, lookup, usable_bytes
from .own_autocast import merge as merge_own_autocast, notes as own_autocast_notes
from .own_checkpointing import policy_ran, text as own_text
from .precision import default_precisions, not_planned, notes, refusal, training
from .timing import (BANDWIDTH_UTILISATION, LAUNCH_S, UTILISATION, micro_step_time,
                     optimizer_time)
from .workloads import batch_form, resolve_workload

__all__ = ["recommend", "Plan", "Option", "Combination", "DEFAULT_POLICIES", "FIT_BATCHES"]

DEFAULT_POLICIES = ("none", "every", "every-2", "selective")


# ------------------------------------------------------------------------------ results
@dataclass
class Option:
    """One configuration: micro_batch x accumulation = effective batch (all numbers estimated)."""
    micro_batch: int
    accumulation: int
    checkpointing: str
    precision: str
    peak_allocated: int          # bytes, steady state
    peak_reserved: int           # bytes, caching-allocator model
    headroom: int                # usable bytes - peak_reserved (negative: does not fit)
    fits: bool
    samples_per_s: float | None  # estimated throughput (None: GPU FLOP/s unknown)
    step_time_s: float | None    # estimated time of one optimizer step (all micro-steps)
    flops_per_sample: float      # counted FLOPs of a training step per sample, incl. recompute
    confirmed: bool = False      # an estimate was run at this very micro-batch
    estimated: bool = True
    communication: dict | None = None  # N GPUs: collectives per optimizer step (a model)
    own_checkpointing: bool = False    # the model checkpoints its blocks itself, as estimated
    policy_applied: bool = True        # False: memprof's policy checkpointed no block (all
    #                                    left to the model's own checkpointing)

    def as_dict(self) -> dict:
        """Its fields, and checkpointing_text as the table shows it (a script need not work
        "model's own" out of own_checkpointing and policy_applied)."""
        return asdict(self) | {"checkpointing_text": self.checkpointing_text}

    @property
    def checkpointing_text(self) -> str:
        """memprof's policy, and the model's own checkpointing where it has some."""
        return own_text(self.checkpointing, self.own_checkpointing, self.policy_applied)

    @property
    def label(self) -> str:
        return (f"{self.precision}, checkpointing {self.checkpointing_text}, micro-batch "
                f"{self.micro_batch} x {self.accumulation}")


def _rank_key(o: Option):
    # a tie between fp16 and bf16 (one speed and size on a GPU with both) goes to bf16: no
    # loss scaling, and fp32's range (models that overflow fp16: precision.fp16_overflow)
    return (not o.fits, -(o.samples_per_s or 0.0), -o.micro_batch, o.precision == "fp16")


def _divisors(n: int) -> list[int]:
    """Divisors of n in increasing order, in O(sqrt(n)) (n may be 10**12)."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def _micro_batches(n: int, max_micro_batch: int) -> list[int]:
    """The micro-batches worth an option: divisors of n up to the largest that fits, and the
    next one up (the first that does not fit; bigger ones cannot fit either)."""
    divs = _divisors(n)
    fit = [d for d in divs if d <= max_micro_batch]
    over = [d for d in divs if d > max_micro_batch][:1]
    return fit + over


class Plan:
    """The result of `recommend`: ranked options plus how they were obtained."""

    def __init__(self, *, gpu, effective_batch, combos, usable, assumptions, model_desc,
                 estimator, lr=None, warmup=None, container=None, wall_s=0.0, estimates=0,
                 blocks=None, own_autocast=None):
        self.gpu = gpu
        self.own_autocast = own_autocast   # the autocast the model's forward enters itself
        self.effective_batch = effective_batch
        self._combos: dict[tuple[str, str], Combination] = combos
        self.usable_bytes = usable
        self.assumptions = assumptions
        self.model = model_desc
        self.optimizer = estimator.optimizer_name
        self.params_bytes = estimator.params_bytes
        # what the steps gave gradients, not what requires grad (an EMA copy held inside
        # the model requires grad and never trains)
        fitted = [c.model.lo.trainable_params for c in combos.values() if c.model is not None]
        self.trainable_params = fitted[0] if fitted else estimator.trainable_params
        self.total_params = estimator.total_params
        self.lr = lr
        self._warmup_steps = warmup
        self.container = container
        self.wall_s = wall_s
        self.estimates = estimates
        self._estimator = estimator
        self._blocks = blocks
        # the precisions of the model's weights: what each precision means for it
        self.model_precision = estimator.model_precision
        # N GPUs (memprof.plan.distributed): effective_batch is then one rank's share
        self.distributed = getattr(estimator, "distributed", None)
        self.world_size = self.distributed.world_size if self.distributed else 1
        self.options: list[Option] = []
        self._rank()

    def _rank(self) -> None:
        """The options of every estimated combination, best first (again after a refit)."""
        eb = self.effective_batch
        self.options = sorted((self._option(c, m, eb // m) for c in self._combos.values()
                               if c.model is not None
                               for m in _micro_batches(eb, c.max_micro_batch)), key=_rank_key)

    # -------------------------------------------------------------- queries
    @property
    def best(self) -> Option | None:
        return next((o for o in self.options if o.fits), None)

    def nearby_batch(self, option: Option | None) -> tuple[int, int] | None:
        """(effective batch, micro-batch) within 10 % of the plan's whose micro-batch is at
        least twice `option`'s and fits its combination: for an effective batch with no
        divisor near the largest micro-batch that fits (a prime one ran micro-batch 1, 199
        times, where 117 fit). None when the option's micro-batch is near that largest one."""
        c = self._combos.get((option.precision, option.checkpointing)) if option else None
        if c is None or c.model is None or not c.max_micro_batch:
            return None
        top = min(c.max_micro_batch, self.effective_batch)
        if option.micro_batch * 2 > top:
            return None
        # (at most 256 either way: each candidate is a divisor search, and an effective batch
        # of tokens may be in the millions)
        eb, reach = self.effective_batch, min(256, max(1, self.effective_batch // 10))
        for e in sorted(range(max(1, eb - reach), eb + reach + 1), key=lambda e: abs(e - eb)):
            micro = max(d for d in _divisors(e) if d <= top)
            if micro >= 2 * option.micro_batch:
                return e, micro
        return None

    @property
    def warmup(self) -> dict | None:
        """The warmup advice for the best option (see warmup_for)."""
        return self.warmup_for(self.best)

    def warmup_for(self, option: Option | None) -> dict | None:
        """Warmup given in micro-steps, in `option`'s optimizer steps (its accumulation);
        None without an option (nothing fits: "ceil(200 / 1)" was the micro-step count)."""
        if self._warmup_steps is None or option is None:
            return None
        return warmup_advice(self._warmup_steps, option.accumulation, self.global_batch)

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all GPUs (micro-batch x accumulation x world)."""
        return self.effective_batch * self.world_size

    @property
    def combinations(self) -> list[Combination]:
        """Every precision x policy of the plan, in search order (estimated or not)."""
        return list(self._combos.values())

    @property
    def failed(self) -> bool:
        """No combination could be estimated (every one raised): no advice, not 'nothing
        fits'."""
        combos = self.combinations
        return bool(combos) and all(c.error is not None for c in combos)

    @property
    def precisions(self) -> set:
        return {p for p, _ in self._combos}

    def training(self, precision: str):
        """How a step in `precision` runs for this model: conversion of its half weights,
        autocast, GradScaler (memprof.plan.precision.training)."""
        return training(self.model_precision, precision)

    def notes(self, option: Option | None = None) -> list[str]:
        """What to know about `option`'s precision for this model on this GPU (default: the
        best option's; with none that fits, every estimated precision's): converted weights,
        no loss scaling, a model that overflows fp16, the model's own autocast."""
        o = option or self.best
        precisions = [o.precision] if o is not None else \
            list(dict.fromkeys(p for p, _ in self._combos))
        return list(dict.fromkeys([n for p in precisions for n in notes(
            self.model_precision, p, self.gpu)] + own_autocast_notes(self.own_autocast, self.gpu)))

    def _combo(self, precision: str, checkpointing: str) -> Combination:
        """The precision x policy, estimated now if the search skipped it or did not cover it
        (two fake steps; kept for later queries)."""
        key = (precision, checkpointing)
        c = self._combos.get(key)
        if c is not None and c.model is not None:
            return c
        if c is not None and c.error is not None:
            raise ValueError(f"{precision}/{checkpointing}: {c.error}")
        if precision not in ESTIMATE_PRECISIONS or \
                refusal(self.model_precision, self.gpu, precision):
            why = refusal(self.model_precision, self.gpu, precision) \
                if precision in ESTIMATE_PRECISIONS else None
            raise ValueError(why or f"precision: {precision!r} cannot be estimated for "
                             f"{self.gpu.name}; expected one of "
                             f"{default_precisions(self.model_precision, self.gpu)}")
        parse_policy(checkpointing, "checkpointing")
        c = Combination(precision, checkpointing)
        search = Search(self._estimator, self.usable_bytes, self.effective_batch,
                        confirm=False, blocks=self._blocks, progress=None,
                        model_name=self.model.get("name", "model"))
        search._fit(c)
        self.estimates += search.runs
        self._combos[key] = c
        return c

    def max_micro_batch(self, precision: str = "fp32", checkpointing: str = "none") -> int:
        """Largest micro-batch whose step fits when gradients are accumulated across
        micro-steps (the general case; 0 = not even 1 fits). Estimated."""
        return self._combo(precision, checkpointing).max_micro_batch

    def predict(self, micro_batch: int, precision: str = "fp32", checkpointing: str = "none",
                accumulation: int | None = None) -> Option:
        """A predicted step for any micro-batch, precision and checkpointing policy (default
        accumulation: effective batch / micro-batch, at least 1). A precision x policy the
        search did not estimate is estimated now."""
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"micro_batch: expected an int >= 1, got {micro_batch!r}")
        if accumulation is not None and (isinstance(accumulation, bool) or not isinstance(
                accumulation, int) or accumulation < 1):
            raise ValueError(f"accumulation: expected an int >= 1, got {accumulation!r}")
        acc = accumulation if accumulation is not None else \
            max(1, math.ceil(self.effective_batch / micro_batch))
        return self._option(self._combo(precision, checkpointing), micro_batch, acc)

    def _option(self, c: Combination, m: int, acc: int) -> Option:
        p = c.model.predict(m, acc)
        t_micro = micro_step_time(p, self.gpu, c.precision, self.params_bytes)
        t_opt = optimizer_time(self.gpu, self.params_bytes, self.trainable_params,
                               c.state_bytes)
        step = None if t_micro is None else acc * t_micro + t_opt
        comm = None
        if self.distributed is not None and t_micro is not None:
            step, comm = self._estimator.step_time(self.gpu, c.precision, acc, t_micro, t_opt,
                                                   c.model.lo.flops_by_phase)
        headroom = self.usable_bytes - p.peak_reserved
        return Option(micro_batch=m, accumulation=acc, checkpointing=c.checkpointing,
                      precision=c.precision, peak_allocated=p.peak_allocated,
                      peak_reserved=p.peak_reserved, headroom=headroom, fits=headroom >= 0,
                      samples_per_s=None if step is None else m * acc * self.world_size / step,
                      step_time_s=step, flops_per_sample=p.flops / m,
                      confirmed=c.confirmed_at == m,
                      communication=comm.as_dict() if comm is not None else None,
                      own_checkpointing=c.model.lo.own_checkpoints > 0,
                      policy_applied=policy_ran(c.checkpointing, c.model.lo))

    def summary_options(self) -> list[Option]:
        """Per precision x policy: the largest fitting micro-batch and the next one up."""
        rows = []
        for c in self._combos.values():
            if c.model is None:
                continue
            mine = sorted((o for o in self.options if o.precision == c.precision
                           and o.checkpointing == c.checkpointing), key=lambda o: o.micro_batch)
            fit = [o for o in mine if o.fits]
            if fit:
                rows.append(fit[-1])
            over = [o for o in mine if not o.fits and (not fit or o.micro_batch > fit[-1]
                                                       .micro_batch)]
            if over:
                rows.append(over[0])
        return sorted(rows, key=_rank_key)

    # -------------------------------------------------------------- output
    def as_dict(self) -> dict:
        combos = []
        for (prec, pol), c in self._combos.items():
            combos.append({"precision": prec, "checkpointing": pol,
                           "max_micro_batch": c.max_micro_batch if c.model else None,
                           "max_micro_batch_is_search_limit":
                               bool(c.model) and c.max_micro_batch >= SEARCH_LIMIT,
                           "confirmed_at": c.confirmed_at, "confirm_agreed": c.confirm_agreed,
                           "exact_interpolation": c.model.exact if c.model else None,
                           "own_checkpoints": c.model.lo.own_checkpoints if c.model else None,
                           "checkpointing_text": c.checkpointing_text,
                           "parameters_bytes": c.params_bytes if c.model else None,
                           "gradients_bytes": c.gradient_bytes if c.model else None,
                           "optimizer_state_bytes": c.state_bytes if c.model else None,
                           "skipped": c.skipped, "error": c.error, "wall_s": round(c.wall_s, 3)})
        best = self.best
        return {
            "estimated": True,
            "gpu": {"name": self.gpu.name, "memory_bytes": self.gpu.memory_bytes,
                    "usable_bytes": self.usable_bytes},
            "model": self.model, "optimizer": self.optimizer,
            "weights_precision": self.model_precision.weights,
            "effective_batch": self.effective_batch,
            "world_size": self.world_size, "global_batch": self.global_batch,
            "parameters": self.total_params, "trainable_parameters": self.trainable_params,
            "parameters_bytes": self.params_bytes,
            "checkpoint_blocks": self.container,
            "best": best.as_dict() if best else None,
            "options": [o.as_dict() for o in self.options],
            "combinations": combos,
            "lr": asdict(self.lr) if self.lr else None,
            "warmup": self.warmup,
            "assumptions": self.assumptions,
            "code": self.code() if best else None,
            "notes": self.notes(best),
            "wall_s": round(self.wall_s, 3), "estimates_run": self.estimates,
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.as_dict(), indent=indent, default=str)

    def code(self, option: Option | None = None) -> str:
        """Python that applies `option` (default: the best one)."""
        return plan_code(self, option)

    def print(self, console=None, all_options: bool = False) -> None:
        """Rich table of the options plus LR / warmup advice and the code for the best
        (`memprof.show(plan)`)."""
        import memprof
        memprof.show(self, console=console, all_options=all_options)

    def __repr__(self) -> str:
        b = self.best
        return (f"Plan(gpu={self.gpu.name!r}, effective_batch={self.effective_batch}, "
                f"options={len(self.options)}, best={b.label if b else None!r})")


# ------------------------------------------------------------------------------ recommend
def _gpu_and_precisions(gpu, effective_batch, precisions, overhead, margin):
    """-> (GPU, usable bytes, precisions to estimate), or a one-line PlanInputError."""
    try:
        g = lookup(gpu)
    except ValueError as e:
        raise PlanInputError(str(e)) from None
    if isinstance(effective_batch, bool) or not isinstance(effective_batch, int) \
            or effective_batch < 1:
        raise PlanInputError(f"effective_batch: expected an int >= 1, got {effective_batch!r}")
    usable = usable_bytes(g, overhead=overhead, margin=margin)
    if precisions is None:   # the model's weights decide (_model_precisions)
        return g, usable, None
    precisions = list(dict.fromkeys(names(precisions, "precisions", ("fp32", "fp16"))))
    for p in precisions:
        why = not_planned(g, p, "precisions")
        if why:
            raise PlanInputError(why, "precisions")
    return g, usable, precisions


def _model_precisions(precisions, estimator, g) -> list[str]:
    """The precisions to estimate for this model (its weights decide: a half-precision model
    trains in its own dtype, memprof.plan.precision), or the one-line PlanInputError."""
    mp = estimator.model_precision
    if precisions is None:
        return default_precisions(mp, g)
    for p in precisions:
        why = refusal(mp, g, p, "precisions")
        if why:
            raise PlanInputError(why, "precisions")
    return precisions


def _asked_policies(policies) -> list[str] | None:
    """The policies asked for, each once, or the one-line error naming `policies` (checked
    before the model is built)."""
    if policies is None:
        return None
    policies = names(policies, "policies", ("none", "every"))
    # each policy once: 'none,none' (or 'none,off') waited on itself for ever, and two
    # spellings of one policy printed two identical rows
    first: dict = {}
    for p in policies:
        try:
            first.setdefault(parse_policy(p, "policies"), p)
        except ValueError as e:
            raise PlanInputError(str(e)) from None
    return list(first.values())


def _policies(module, policies, blocks) -> list[str]:
    if policies is None:
        return policies_for(module, DEFAULT_POLICIES) if blocks is None \
            else list(DEFAULT_POLICIES)
    return _asked_policies(policies)


def _container(module, policies, blocks) -> str | None:
    """What the plan's code says it checkpoints, e.g. 'model.blocks (12 blocks)'."""
    if not any(parse_policy(p)[0] != "none" for p in policies):
        return None
    try:
        name, mods = find_blocks(module) if blocks is None else (str(blocks), [])
    except ValueError:
        return None
    if name and mods:   # several stacks (an encoder-decoder): each named
        return ", ".join(f"model.{n}" for n in name.split(",")) + f" ({len(mods)} blocks)"
    return f"{blocks}"


def _assumptions(overhead, margin) -> dict:
    return {
        "utilisation": dict(UTILISATION), "bandwidth_utilisation": BANDWIDTH_UTILISATION,
        "launch_s_per_op": LAUNCH_S,
        "overhead_bytes": DEFAULT_OVERHEAD_BYTES if overhead is None else int(overhead),
        "margin": FIT_MARGIN if margin is None else float(margin),
        "fit_batches": list(FIT_BATCHES),
        "memory": "steady state: optimizer state (and, with accumulation > 1, gradients) "
                  "exist from the start of the step",
        "throughput": "counted FLOPs incl. recompute / (peak x utilisation) + 2 x bytes "
                      "allocated + 3 x parameter bytes / (bandwidth x bandwidth_utilisation)",
    }


def _kernel_assumptions(estimator: Estimator, combos) -> dict:
    """Which CUDA kernel rules the estimates applied (memprof.plan.cuda_kernels)."""
    rules: dict[str, int] = {}
    for c in combos.values():
        if c.model is not None:
            for k, n in c.model.lo.kernel_rules.items():
                rules[k] = max(rules.get(k, 0), n)
    t = estimator.kernel_target
    return {"target": t.name if t else "cpu",
            "compute_capability": list(t.compute_capability) if t else None,
            "rules_applied_per_step": rules,
            "cublas_workspace_bytes": cublas_workspace_bytes(t) if t else 0,
            "not_modelled": list(NOT_MODELLED)}


def recommend(model="dcal-vit-b16", batch=None, loss=None, optimizer="adamw",
              gpu="v100-16gb", effective_batch: int = 16, precisions=None, policies=None,
              base_lr: float | None = None, base_batch: int | None = None, progress=None, *,
              lr: float | None = None, warmup_steps: int | None = None, input_shape=None,
              num_classes: int | None = None, model_kwargs: dict | None = None,
              confirm: bool = True, blocks=None, overhead: int | None = None,
              margin: float | None = None, distributed=None,
              workers: int | None = None) -> Plan:
    """Search micro-batch x accumulation x checkpointing x precision for `gpu` (estimated).

    model: built-in name (memprof.models.MODELS), 'package.module:factory', a factory
    () -> nn.Module, or an nn.Module. batch: batch_size -> (inputs, targets) (built-ins bring
    theirs; else input_shape=(3, 224, 224) makes a classification batch). loss: (outputs,
    targets) -> scalar. optimizer: 'adamw' | 'adam' | 'sgd' or params -> Optimizer.
    precisions, policies: lists of names, e.g. ['fp32', 'bf16'] and ['none', 'every'], or
    one string read as the command line reads it: 'fp32,bf16' is two, 'fp16' one (an empty
    item, 'none,,every', is refused). precisions: default the
    ones the GPU supports among fp32, fp16, bf16 for a model with fp32 weights; a model in
    half precision trains in its own (`memprof.plan.precision`: converted to fp16 where the
    GPU lacks bf16). policies: default none, every, every-2, selective (those that apply to
    the model). progress: called as progress(done, total, label) while estimating. See the
    module docstring for the models of memory, fit and throughput. distributed: a
    `memprof.plan.distributed.data_parallel(...)` spec -> one rank of N GPUs is planned (effective_batch is then the global batch).
    workers: processes estimating combinations side by side (default: the usable cores, 1
    in a process holding CUDA or a process group; 1: all in this process)."""
    t0 = time.perf_counter()
    g, usable, precisions = _gpu_and_precisions(gpu, effective_batch, precisions, overhead,
                                                margin)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise PlanInputError(f"workers: expected an int >= 1, got {workers!r}")
    if distributed is not None and not isinstance(distributed, Distributed):
        raise PlanInputError(f"distributed: expected memprof.plan.distributed.data_parallel"
                             f"(...), got {type(distributed).__name__}")
    per_rank = distributed.per_rank_batch(effective_batch) if distributed else effective_batch
    policies = _asked_policies(policies)
    module, make_batch, loss_fn, desc = resolve_workload(model, batch, loss, input_shape,
                                                         num_classes, model_kwargs)
    if isinstance(blocks, str):   # a wrong name is the user's to fix, not "nothing fits"
        try:
            resolve_blocks(module, blocks)
        except ValueError as err:
            raise PlanInputError(str(err), getattr(err, "input", None) or "blocks") from None
    policies = _policies(module, policies, blocks)
    container = _container(module, policies, blocks)
    lr_adv = None
    if lr is not None and base_lr is None:   # nothing to check it against: say so
        raise PlanInputError(f"lr {lr!r}: needs base_lr and base_batch (the recipe's learning "
                             "rate and the batch it was tuned for) to be checked")
    if base_lr is not None or base_batch is not None:
        lr_adv = lr_advice(base_lr, base_batch, effective_batch, optimizer, lr)
    if warmup_steps is not None and (isinstance(warmup_steps, bool) or
                                     not isinstance(warmup_steps, int) or warmup_steps < 0):
        raise PlanInputError(f"warmup_steps: expected an int >= 0 (micro-steps), got "
                             f"{warmup_steps!r}")
    if distributed is not None:     # one rank of N GPUs (memprof.plan.distributed)
        estimator = RankEstimator(module, make_batch, loss_fn, optimizer=optimizer, gpu=g,
                                  distributed=distributed, blocks=blocks)
    else:
        estimator = Estimator(module, make_batch, loss_fn, optimizer=optimizer, gpu=g)
    desc.update(batch_form(make_batch))
    precisions = _model_precisions(precisions, estimator, g)
    search = Search(estimator, usable, per_rank, confirm=confirm, blocks=blocks,
                    progress=progress, model_name=desc["name"], workers=workers)
    combos = search.run(precisions, policies)
    own_amp = next((c.model.lo.own_autocast for c in combos.values()
                    if c.model is not None and c.model.lo.own_autocast), None)
    merge_own_autocast(combos, own_amp)   # one row for the precisions the model overrides
    if "loss" not in desc:      # default_loss: the rule its estimates applied
        rule = next((c.model.lo.loss_rule for c in combos.values()
                     if c.model is not None and c.model.lo.loss_rule), None)
        if rule is not None:
            desc["loss"] = rule
    assumptions = _assumptions(overhead, margin) | {"kernels": _kernel_assumptions(
        estimator, combos)} | ({"gpu": g.note} if g.note else {}) | (
        {"distributed": estimator.assumptions(precisions)} if distributed else {})
    plan = Plan(gpu=g, effective_batch=per_rank, combos=combos, usable=usable,
                assumptions=assumptions, model_desc=desc,
                estimator=estimator, lr=lr_adv, warmup=warmup_steps, container=container,
                estimates=search.runs, blocks=blocks, own_autocast=own_amp)
    search.finish(plan)
    plan.wall_s = time.perf_counter() - t0
    return plan
