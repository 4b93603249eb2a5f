"""Plans for N GPUs: one rank of a data-parallel job (DDP, ZeRO-1/2/3, FSDP), estimated.

    dist = data_parallel("zero3", gpus=8, nodes=1)
    plan = memprof.recommend(model=..., gpu="a100-80gb", effective_batch=256, distributed=dist)

Strategies (`--strategy`; aliases after the name):

    ddp                        DistributedDataParallel: every rank holds everything; gradient
                               buckets; one all-reduce of the gradients per optimizer step
    zero1                      + optimizer state (zero-paper: + fp32 master weights) sharded: DDP +
                               torch.distributed.optim.ZeroRedundancyOptimizer, DeepSpeed stage 1
    zero2  fsdp-grad-op,       + gradients sharded (reduce-scatter): DeepSpeed stage 2, FSDP's
           shard-grad-op         SHARD_GRAD_OP / fully_shard(reshard_after_forward=False)
    zero3  fsdp-full, fsdp,    + parameters sharded, all-gathered block by block: FSDP2
           full-shard            fully_shard per block (reshard_after_forward=True), stage 3

What runs, and why the rest is modelled
---------------------------------------
Tried on this CPU build (torch 2.13) with the fake process group (`init_process_group("fake",
store=FakeStore(), ...)`): FSDP2 `fully_shard` runs a full fake step under FakeTensorMode when
the device mesh is created outside the fake mode, and its all-gather buffers are visible to a
dispatch mode; DDP does not (its C++ reducer touches the data of fake parameters: "The tensor
has a non-zero number of elements, but its data is not allocated yet"), and ZeRO-1/2's
DeepSpeed layout has no torch implementation to run. So that every strategy goes through the
same batch model and allocator replay, each rank's stream is derived from the single-rank fake
step (same ops, same activations) by these rules - `Plan.assumptions["distributed"]` lists the
ones applied:

1. Layout (memprof.plan.rank_layout; `layout=`): "torch" (the default) counts what the printed
   torch code allocates: DDP (ddp, zero1) keeps fp32 weights under autocast, so the step is
   the single-GPU AMP step as it is (4 + 4 + the optimizer's fp32 state); FSDP2 (zero2,
   zero3, MixedPrecisionPolicy(param_dtype=half, reduce_dtype=fp32)) computes with half
   parameters and gradients and keeps fp32 shards of the parameters, gradients and state.
   "zero-paper" is the ZeRO paper's mixed-precision Adam (2 + 2 + 12 bytes per parameter):
   half working weights and gradients, and fp32 master weights + the optimizer's state in
   fp32 in place of the state. A step with half working weights runs as the fake step with
   `param_dtype=half`; its optimizer temporaries are counted in fp32.
2. Sharding: "optimizer" (zero1+) divides the optimizer state and the optimizer step's
   temporaries by N (zero1 under "torch": the largest rank's share of ZeroRedundancyOptimizer's
   partition of whole parameters); "gradients" (zero2+) divides the gradients; "parameters"
   (zero3, and zero2 under "torch": fully_shard shards them) divides the parameters. Each
   shard is rounded up (FSDP pads every tensor to a multiple of N).
3. DDP buckets (ddp, zero1): `gradient_as_bucket_view=False` (DDP's default) keeps one flat
   copy of all gradients, allocated when DDP wraps the model and never freed.
4. Reduce-scatter (zero2, zero3): each gradient is first produced whole, and freed once its
   block's backward ends (the block's reduce-scatter, whose input is a flat copy of the
   block's whole gradients, briefly live beside them; in fp32 under "torch", FSDP2's
   reduce_dtype); only the shard stays.
5. All-gather (zero3): the blocks (the repeated blocks that checkpointing uses, or `blocks=`)
   and the root (everything else) are the FSDP units. A block's whole parameters are gathered
   from its first op to its last in forward, and again in backward (where autograd
   interleaves two blocks, both are gathered); the root's from the first forward op to the
   end of backward (the root is not resharded after forward). Each gather briefly holds the
   flat all-gather output beside the parameters it is copied out to. zero2 under "torch"
   (reshard_after_forward=False) gathers each unit once, from its first forward op to the
   end of its backward.
Rules 4 and 5 follow what FSDP2 allocates in a fake step under the fake process group
(tests/plan/fsdp_fake_pg.py records one rank of it): for a 4-block MLP at world 4 the rules'
steady peak above the model states came 8 % above FSDP2's (fp32, batch 16), the model
states exactly; under the printed code's MixedPrecisionPolicy (bf16, "torch" layout,
tests/plan/fsdp_fake_pg.py WORLD RESHARD) 6 % below for zero3 and 2 % above for zero2.
Inserted buffers are category "communication". Communication time: `plan.communication`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch.nn as nn

from ..profile import Profile
from ..record.events import (CAT_COMMUNICATION, CAT_GRADIENTS, CAT_OPTIMIZER_STATE,
                             CAT_PARAMETERS, PHASE_BACKWARD, PHASE_FORWARD,
                             PHASE_OPTIMIZER, PREEXISTING_THREAD)
from .checkpoint import resolve_blocks
from .communication import COMM_UTILISATION, step_communication
from .cuda_autocast import LOW_PRECISION_DTYPES
from .errors import PlanInputError
from .estimate import Estimate, Estimator
from .rank_layout import (DEFAULT_LAYOUT, LAYOUTS, bytes_per_parameter, fp32_reduce, fsdp,
                          gathered, half_working_weights, layout_name, layout_note,
                          optimizer_share, optimizer_state_bytes, sharded,
                          zero_model_state_bytes)
from .streams import VARIANTS, live_by_category, reserved_peak

__all__ = ["Strategy", "STRATEGIES", "strategy", "Distributed", "data_parallel",
           "RankEstimator", "zero_model_state_bytes", "LAYOUTS"]


@dataclass(frozen=True)
class Strategy:
    """A data-parallel strategy: what it shards and how (see the module docstring)."""
    name: str
    aliases: tuple[str, ...]
    shards: frozenset           # of "optimizer", "gradients", "parameters"
    zero_stage: int
    what: str
    how: str                    # how to get it in torch

    @property
    def buckets(self) -> bool:
        """DDP's gradient buckets (the strategies that all-reduce whole gradients)."""
        return "gradients" not in self.shards


STRATEGIES = {s.name: s for s in (
    Strategy("ddp", (), frozenset(), 0,
             "DistributedDataParallel: parameters, gradients and optimizer state on every rank",
             "model = DistributedDataParallel(model, device_ids=[local_rank])"),
    Strategy("zero1", ("zero-1", "os"), frozenset({"optimizer"}), 1,
             "optimizer state sharded (DDP + ZeroRedundancyOptimizer, DeepSpeed stage 1)",
             "DistributedDataParallel(model) + torch.distributed.optim.ZeroRedundancyOptimizer("
             "model.parameters(), optimizer_class=torch.optim.AdamW)"),
    Strategy("zero2", ("zero-2", "fsdp-grad-op", "shard-grad-op"),
             frozenset({"optimizer", "gradients"}), 2,
             "optimizer state and gradients sharded (DeepSpeed stage 2, FSDP SHARD_GRAD_OP)",
             "fully_shard(block, reshard_after_forward=False) for every block, then "
             "fully_shard(model, reshard_after_forward=False)"),
    Strategy("zero3", ("zero-3", "fsdp-full", "fsdp", "full-shard"),
             frozenset({"optimizer", "gradients", "parameters"}), 3,
             "parameters, gradients and optimizer state sharded (FSDP2 fully_shard per block, "
             "DeepSpeed stage 3)",
             "fully_shard(block) for every block, then fully_shard(model) "
             "(torch.distributed.fsdp)"),
)}
_BY_ALIAS = {a: s for s in STRATEGIES.values() for a in (s.name,) + s.aliases}


def strategy(name) -> Strategy:
    """A strategy by name or alias; one-line error otherwise."""
    if isinstance(name, Strategy):
        return name
    s = _BY_ALIAS.get(str(name).strip().lower().replace("_", "-"))
    if s is None:
        known = ", ".join(f"{s.name} ({', '.join(s.aliases)})" if s.aliases else s.name
                          for s in STRATEGIES.values())
        raise PlanInputError(f"strategy {name!r}: expected one of {known}")
    return s


@dataclass(frozen=True)
class Distributed:
    """N ranks (one per GPU) over `nodes` nodes, running `strategy`, their model states laid
    out as `layout` says (memprof.plan.rank_layout)."""
    strategy: Strategy
    world_size: int
    nodes: int = 1
    layout: str = DEFAULT_LAYOUT

    @property
    def gpus_per_node(self) -> int:
        return self.world_size // self.nodes

    def per_rank_batch(self, effective_batch: int) -> int:
        """Samples per rank and optimizer step (micro-batch x accumulation on one GPU)."""
        if effective_batch % self.world_size:
            raise PlanInputError(
                f"effective batch {effective_batch}: not divisible by the world size "
                f"{self.world_size} (each of the {self.world_size} GPUs takes micro-batch x "
                f"accumulation samples); use a multiple of {self.world_size}")
        return effective_batch // self.world_size

    def as_dict(self) -> dict:
        return {"strategy": self.strategy.name, "zero_stage": self.strategy.zero_stage,
                "world_size": self.world_size, "nodes": self.nodes,
                "gpus_per_node": self.gpus_per_node, "layout": self.layout,
                "shards": sorted(sharded(self.layout, self.strategy))}


def _positive_int(value, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PlanInputError(f"{label}: expected an int >= 1, got {value!r}")
    return int(value)


def data_parallel(strategy_name="ddp", gpus: int = 8, nodes: int = 1,
                  layout: str = DEFAULT_LAYOUT) -> Distributed:
    """A Distributed spec from what a user types (one-line errors for bad input). layout:
    "torch" (what the printed code allocates) or "zero-paper" (memprof.plan.rank_layout)."""
    s = strategy(strategy_name)
    layout = layout_name(layout)
    gpus = _positive_int(gpus, "gpus")
    nodes = _positive_int(nodes, "nodes")
    if nodes > gpus:
        raise PlanInputError(f"nodes {nodes}: more nodes than GPUs ({gpus}); each node needs "
                             "at least one GPU")
    if gpus % nodes:
        raise PlanInputError(f"gpus {gpus}: not divisible by nodes {nodes}; expected the same "
                             "number of GPUs on every node")
    return Distributed(s, gpus, nodes, layout)


# ------------------------------------------------------------------------------ units
def _units(module: nn.Module, s: Strategy, blocks) -> tuple[list[str], list[nn.Module]]:
    """The FSDP units (qualified names, modules): the repeated blocks; zero3 needs them."""
    try:
        _, mods = resolve_blocks(module, blocks)
    except (ValueError, TypeError) as e:
        if s.zero_stage == 3:
            raise PlanInputError(
                f"strategy {s.name}: {type(module).__name__} has no repeated blocks to wrap "
                f"with fully_shard ({str(e).splitlines()[0]}); pass blocks= / --blocks, or use "
                "zero2 or ddp") from None
        return [], []
    names = {id(m): n for n, m in module.named_modules()}
    picked = [(names[id(m)], m) for m in mods if id(m) in names]
    return [n for n, _ in picked], [m for _, m in picked]


def _working_bytes(params, low_itemsize: int | None) -> int:
    """Bytes of parameters as the step holds them (floating ones in half precision when
    `low_itemsize` is given)."""
    total, seen = 0, set()
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        size = low_itemsize if low_itemsize and p.is_floating_point() else p.element_size()
        total += p.numel() * size
    return total


# ------------------------------------------------------------------------------ the rank stream
@dataclass
class _Events:
    """A rank's events in step order ('first' variant), before the variant's reordering."""
    key: np.ndarray          # sort key: 3 x event index (+0 before, +1 the event, +2 after)
    ptr: np.ndarray
    size: np.ndarray
    cat: np.ndarray
    base: np.ndarray         # exists before the step (pre-existing blocks, DDP buckets)
    movable: np.ndarray      # an allocation of the step that is its original's (not inserted)
    backward_end_key: int


class _RankRules:
    """Applies the rules of the module docstring to one single-rank profile."""

    def __init__(self, dist: Distributed, unit_names: list[str], unit_bytes: dict,
                 trainable_numels: list[int]):
        self.dist, self.unit_names, self.unit_bytes = dist, unit_names, unit_bytes
        self.trainable = sum(trainable_numels)
        self.optimizer_share = optimizer_share(dist.layout, dist.strategy, dist.world_size,
                                               trainable_numels)

    def _unit_of(self, profile: Profile) -> np.ndarray:
        """FSDP unit per memory event: block index, or len(blocks) for the root."""
        root = len(self.unit_names)
        lut = np.full(len(profile.modules) + 1, root, dtype=np.int64)
        for mid, name in enumerate(profile.modules):
            for u, un in enumerate(self.unit_names):
                if name == un or name.startswith(un + "."):
                    lut[mid] = u
                    break
        mod = profile.event_module.astype(np.int64)
        return lut[np.where(mod < 0, len(profile.modules), mod)]

    def events(self, profile: Profile) -> _Events:
        s, n_world, layout = self.dist.strategy, self.dist.world_size, self.dist.layout
        mem = profile.memory
        n = mem.size
        size = profile.effective_size.astype(np.int64)
        cat = profile.category.astype(np.int64)
        phase = mem["phase"]
        alloc_of = profile.alloc_of
        precision = profile.meta.get("precision", "fp32")
        half = half_working_weights(layout, s, precision)   # the step ran with half weights
        state = (size > 0) & (cat == CAT_OPTIMIZER_STATE)
        state_bytes = int(size[state].sum())
        factor = np.ones(n)
        opt_temp = (phase == PHASE_OPTIMIZER) & ~np.isin(
            cat, (CAT_PARAMETERS, CAT_GRADIENTS, CAT_OPTIMIZER_STATE))
        if half:                                            # rule 1
            factor[opt_temp] *= 2.0                         # the optimizer works on fp32
            if layout == "zero-paper" and state_bytes:
                # fp32 master weights (4 B / parameter) + the state in fp32 (2 x half)
                factor[cat == CAT_OPTIMIZER_STATE] = (4 * self.trainable + 2 * state_bytes) \
                    / state_bytes
            elif layout == "torch":      # FSDP2: fp32 shards of everything the step holds
                factor[np.isin(cat, (CAT_PARAMETERS, CAT_GRADIENTS,
                                     CAT_OPTIMIZER_STATE))] *= 2.0
        shard, shards = 1.0 / n_world, sharded(layout, s)
        if "optimizer" in shards:
            factor[(cat == CAT_OPTIMIZER_STATE) | opt_temp] *= self.optimizer_share
        if "gradients" in shards:
            factor[cat == CAT_GRADIENTS] *= shard
        if "parameters" in shards:
            factor[cat == CAT_PARAMETERS] *= shard
        frees = np.flatnonzero((size < 0) & (alloc_of >= 0))
        factor[frees] = factor[alloc_of[frees]]    # a free releases what its allocation took
        new = np.sign(size) * np.ceil(np.abs(size) * factor - 1e-9).astype(np.int64)
        idx = np.arange(n, dtype=np.int64)
        token = np.where(size < 0, alloc_of, idx)
        token[token < 0] = idx[token < 0]
        ins_key, ins_size, ins_base, ins_token = [], [], [], []

        def insert(k_alloc: int, k_free: int | None, nbytes: int, base: bool = False) -> int:
            """A buffer allocated at sort key k_alloc (freed at k_free) -> its token."""
            token = len(ins_key)
            ins_key.append(k_alloc), ins_size.append(int(nbytes)), ins_base.append(base)
            ins_token.append(token)
            if k_free is not None:
                release(k_free, token)
            return token

        def release(k_free: int, token: int) -> None:
            ins_key.append(k_free), ins_size.append(-ins_size[token]), ins_base.append(False)
            ins_token.append(token)

        grads = np.flatnonzero((size > 0) & (cat == CAT_GRADIENTS)
                               & (mem["thread"] != PREEXISTING_THREAD))
        fwd, bwd = np.flatnonzero(phase == PHASE_FORWARD), np.flatnonzero(phase == PHASE_BACKWARD)
        last_bwd = int(bwd[-1]) if bwd.size else (int(fwd[-1]) if fwd.size else n - 1)
        if s.buckets and n_world > 1:                       # rule 3
            insert(-1, None, int(size[grads].sum()), base=True)
        unit = self._unit_of(profile) if fsdp(s) else None
        reduce_factor = 2 if fp32_reduce(layout, s, precision) else 1
        spans = {}
        if unit is not None:
            for u in range(len(self.unit_names) + 1):
                f, b = fwd[unit[fwd] == u], bwd[unit[bwd] == u]
                spans[u] = ((int(f[0]), int(f[-1])) if f.size else None,
                            (int(b[0]), int(b[-1])) if b.size else None)
        how = gathered(layout, s)
        if how and n_world > 1:     # rule 5 (inserted first: a unit's gathered parameters
            self._gathers(spans, fwd, last_bwd, insert, release, precision,   # go before
                          hold=how == "forward-to-backward")   # its reduce-scatter's copy)
        if unit is not None:
            root = len(self.unit_names)
            flat: dict[int, int] = {}
            for i in grads:                                 # rule 4
                b = spans[int(unit[i])][1] if int(unit[i]) != root else None
                end = max(b[1], int(i)) if b else last_bwd
                insert(3 * int(i), 3 * end + 2, size[i])
                flat[end] = flat.get(end, 0) + int(size[i])
            for end, nbytes in flat.items():   # the reduce-scatter's input: a flat copy
                insert(3 * end + 1, 3 * end + 2, reduce_factor * nbytes)
        k = len(ins_key)
        return _Events(
            key=np.concatenate([3 * idx + 1, np.asarray(ins_key, dtype=np.int64)]),
            ptr=np.concatenate([token + 1, n + 1 + np.asarray(ins_token, dtype=np.int64)]
                               ).astype(np.uint64),
            size=np.concatenate([new, np.asarray(ins_size, dtype=np.int64)]),
            cat=np.concatenate([cat, np.full(k, CAT_COMMUNICATION, dtype=np.int64)]),
            base=np.concatenate([mem["thread"] == PREEXISTING_THREAD,
                                 np.asarray(ins_base, dtype=bool)]),
            movable=np.concatenate([(size > 0) & (mem["thread"] != PREEXISTING_THREAD),
                                    np.zeros(k, dtype=bool)]),
            backward_end_key=3 * last_bwd + 2)

    def _gathers(self, spans, fwd, last_bwd, insert, release, precision, hold: bool) -> None:
        """Rule 5: all-gathered parameters of each unit, and the flat all-gather output they
        are copied out of, which lives until the next unit's gather (as FSDP2 frees it).
        After a unit's backward they are freed before its reduce-scatter copies the gradients
        (FSDP2's post-backward reshards first). hold: gathered once in forward and kept to the
        end of the unit's backward."""
        nbytes = self.unit_bytes[precision]
        root = len(self.unit_names)
        root_flat = None
        if fwd.size and nbytes[root]:
            root_flat = insert(3 * int(fwd[0]), None, nbytes[root])
            insert(3 * int(fwd[0]), 3 * last_bwd + 1, nbytes[root])
        ends = (3 * int(fwd[-1]) + 2 if fwd.size else 3 * last_bwd + 2, 3 * last_bwd + 2)
        for phase in ((0,) if hold else (0, 1)):
            order = sorted((sp[phase][0], u) for u, sp in spans.items()
                           if u != root and sp[phase] is not None)
            for start, u in order:
                after_backward = phase == 1 or (hold and spans[u][1] is not None)
                end = spans[u][1][1] if after_backward else spans[u][phase][1]
                flat = insert(3 * start, None, nbytes[u])     # the flat all-gather output,
                insert(3 * start, 3 * end + (1 if after_backward else 2), nbytes[u])  # copied
                release(3 * start, flat)
            if phase == 0 and root_flat is not None:
                release(3 * int(fwd[0]), root_flat)

    def stream(self, profile: Profile, variant: str) -> tuple[np.ndarray, np.ndarray]:
        """(ptr, size) of the rank's step in a variant (the reordering of
        memprof.plan.streams.step_stream: pre-existing, then moved, then the rest)."""
        ev = self.events(profile)
        return self._ordered(ev, variant)[:2]

    @staticmethod
    def _ordered(ev: _Events, variant: str):
        order = np.argsort(ev.key, kind="stable")
        if variant == "first":
            return ev.ptr[order], ev.size[order], ev.cat[order]
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
        cats = [CAT_OPTIMIZER_STATE] + ([CAT_GRADIENTS] if variant == "accumulate" else [])
        moved = ev.movable[order] & np.isin(ev.cat[order], cats)
        base = ev.base[order]
        order = np.concatenate([order[base], order[moved & ~base], order[~base & ~moved]])
        return ev.ptr[order], ev.size[order], ev.cat[order]


# ------------------------------------------------------------------------------ the estimator
class RankEstimator:
    """An `Estimator` for one rank of a data-parallel job: every step is the single-rank fake
    step (with half-precision working weights where the layout computes with them, rule 1)
    turned into the rank's stream by the module docstring's rules; its peaks are the rank's.
    Everything else (FLOPs, ops, the profile for reports) is the single-rank step's."""

    def __init__(self, module: nn.Module, make_batch, loss_fn=None, *, optimizer="adamw",
                 gpu=None, distributed: Distributed, blocks=None):
        self.distributed = distributed
        self._args = (module, make_batch, loss_fn)
        self._kw = {"optimizer": optimizer, "gpu": gpu}
        self.optimizer_state_bytes = optimizer_state_bytes(optimizer)
        self.base = Estimator(module, make_batch, loss_fn, **self._kw)
        self._low: dict[str, Estimator] = {}
        names, mods = _units(module, distributed.strategy, blocks)
        in_blocks = {id(p) for m in mods for p in m.parameters()}
        rest = [p for p in module.parameters() if id(p) not in in_blocks]
        trainable = [p for p in module.parameters() if p.requires_grad]
        unit_bytes, self.grad_bytes = {}, {}
        for prec in ("fp32",) + tuple(LOW_PRECISION_DTYPES):
            low = LOW_PRECISION_DTYPES.get(prec)
            itemsize = low.itemsize if low is not None else None
            unit_bytes[prec] = [_working_bytes(m.parameters(), itemsize) for m in mods] + \
                [_working_bytes(rest, itemsize)]
            self.grad_bytes[prec] = _working_bytes(trainable, itemsize)
        self.units = names
        self.unit_bytes = unit_bytes
        self.trainable_numels = [p.numel() for p in trainable]
        self.rules = _RankRules(distributed, names, unit_bytes, self.trainable_numels)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("base", "_low"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def _estimator(self, precision: str) -> Estimator:
        """The single-rank estimator of a precision: half working weights where rule 1 says."""
        d = self.distributed
        if not half_working_weights(d.layout, d.strategy, precision):
            return self.base
        low = LOW_PRECISION_DTYPES[precision]
        if precision not in self._low:
            self._low[precision] = Estimator(*self._args, **self._kw, param_dtype=low)
        return self._low[precision]

    def stream(self, profile: Profile, variant: str = "first"):
        """The rank's (ptr, size) stream of a single-rank profile (for BatchModel)."""
        return self.rules.stream(profile, variant)

    def step(self, batch_size: int, *, precision: str = "fp32", checkpointing: str = "none",
             blocks=None, count_flops: bool = True, simulate: bool = True) -> Estimate:
        est = self._estimator(precision).step(batch_size, precision=precision,
                                              checkpointing=checkpointing, blocks=blocks,
                                              count_flops=count_flops, simulate=False)
        ev = self.rules.events(est.profile)
        peaks, at_peak = {}, {}
        for variant in VARIANTS:
            ptr, size, cat = _RankRules._ordered(ev, variant)
            live = np.cumsum(size)
            top = int(np.argmax(live)) if live.size else 0
            peaks[variant] = (int(live[top]) if live.size else 0,
                              reserved_peak(ptr, size) if simulate and size.size else 0)
            if variant in ("first", "steady"):
                at_peak[variant] = _breakdown(size[:top + 1], cat[:top + 1])
        est.profile.meta["distributed"] = self.distributed.as_dict()
        return dataclasses.replace(
            est, peak_allocated=peaks["first"][0], peak_reserved=peaks["first"][1],
            steady_peak_allocated=peaks["steady"][0], steady_peak_reserved=peaks["steady"][1],
            accumulating_peak_allocated=peaks["accumulate"][0],
            accumulating_peak_reserved=peaks["accumulate"][1],
            by_category=at_peak["steady"], first_by_category=at_peak["first"])

    def communication(self, gpu, precision: str, accumulation: int, micro_s: float,
                      flops_by_phase: dict):
        """The rank's collectives per optimizer step (memprof.plan.communication), with the
        micro-step's time split between forward and backward by their counted FLOPs."""
        fwd, bwd = flops_by_phase.get("forward", 0), flops_by_phase.get("backward", 0)
        share = fwd / (fwd + bwd) if fwd + bwd else 1 / 3
        d = self.distributed
        # as communicated: torch's DDP all-reduces and broadcasts fp32, FSDP2 all-gathers
        # param_dtype and reduce-scatters in fp32; the ZeRO paper moves the working precision
        working = precision if half_working_weights(d.layout, d.strategy, precision) \
            else "fp32"
        reduced = "fp32" if d.layout == "torch" else working
        return step_communication(d, gpu,
                                  param_bytes=sum(self.unit_bytes[working]),
                                  grad_bytes=self.grad_bytes[reduced],
                                  accumulation=accumulation, forward_s=share * micro_s,
                                  backward_s=(1 - share) * micro_s)

    def step_time(self, gpu, precision: str, accumulation: int, micro_s: float,
                  optimizer_s: float, flops_by_phase: dict) -> tuple[float, object]:
        """(seconds of one optimizer step on a rank, its StepCommunication or None): the
        micro-steps, the optimizer step on the rank's shard, the exposed communication."""
        comm = self.communication(gpu, precision, accumulation, micro_s, flops_by_phase)
        if "optimizer" in self.distributed.strategy.shards:
            optimizer_s /= self.distributed.world_size
        return (accumulation * micro_s + optimizer_s + (comm.exposed_s if comm else 0.0),
                comm)

    def assumptions(self, precisions) -> dict:
        """What a plan says about the rules it applied (module docstring)."""
        d = self.distributed
        s, shards = d.strategy, sharded(d.layout, d.strategy)
        state, share = self.optimizer_state_bytes, self.rules.optimizer_share
        rules = [f"1 {layout_note(d.layout, s, p, d.world_size, state, share)}"
                 for p in precisions]
        if shards:
            rules.append(f"2 sharded over {self.distributed.world_size} ranks: "
                         f"{', '.join(sorted(shards))} (each shard rounded up)")
        if s.buckets and self.distributed.world_size > 1:
            rules.append("3 DDP gradient buckets: one flat copy of the gradients "
                         "(gradient_as_bucket_view=False, DDP's default)")
        if fsdp(s):
            rules.append("4 reduce-scatter: whole gradients live until their block's backward "
                         "ends" + (" (reduced in fp32)" if d.layout == "torch" else ""))
        how = gathered(d.layout, s)
        if how:
            rules.append(f"5 all-gather: {len(self.units)} blocks + the root as FSDP units, "
                         + ("each gathered while it runs" if how == "per-phase" else
                            "each gathered from its forward to the end of its backward")
                         + "; the root for forward + backward")
        return self.distributed.as_dict() | {
            "layout_means": LAYOUTS[d.layout],
            "bytes_per_parameter": {p: bytes_per_parameter(d.layout, s, p, d.world_size, state,
                                                           share) for p in precisions},
            "what": s.what, "how": s.how, "rules_applied": rules,
            "per_rank": "memory is one rank's; samples/s are the whole job's",
            "communication": "a model: ring collectives over the GPU table's link "
                             f"x {COMM_UTILISATION:.0%}, overlapped with the phase it can "
                             "hide behind (memprof.plan.communication)"}

    def model_states(self, est: Estimate, distributed: Distributed | None = None) -> dict:
        """Bytes per rank of parameters and gradients live when backward ends, and of the
        optimizer state (with master weights) once it exists: the ZeRO paper's model states.
        `distributed`: under another strategy / world size (same step, same units; one whose
        layout runs the step in other working weights needs its own RankEstimator)."""
        if distributed is not None:
            precision = est.profile.meta.get("precision", "fp32")
            mine = self.distributed
            if half_working_weights(distributed.layout, distributed.strategy, precision) != \
                    half_working_weights(mine.layout, mine.strategy, precision):
                raise PlanInputError(
                    f"distributed: {distributed.strategy.name} under the {distributed.layout} "
                    f"layout computes with other working weights than {mine.strategy.name} "
                    f"under {mine.layout} at {precision}; estimate it with its own "
                    "RankEstimator")
        rules = self.rules if distributed is None else _RankRules(
            distributed, self.units, self.unit_bytes, self.trainable_numels)
        ev = rules.events(est.profile)
        before = ev.key <= ev.backward_end_key
        out = {}
        for name, code in (("parameters", CAT_PARAMETERS), ("gradients", CAT_GRADIENTS)):
            out[name] = int(ev.size[before & (ev.cat == code)].sum())
        out["optimizer_state"] = int(ev.size[(ev.size > 0) & (ev.cat == CAT_OPTIMIZER_STATE)]
                                     .sum())
        out["communication_buffers_at_end_of_backward"] = int(
            ev.size[before & (ev.cat == CAT_COMMUNICATION)].sum())
        return out


def _breakdown(size: np.ndarray, cat: np.ndarray) -> dict:
    """Live bytes per category after the last event given (the peak), the categories with
    some only."""
    return {name: live for name, live in live_by_category(size, cat).items() if live}
