"""How one rank of a data-parallel job holds its model states: the layout of a plan for N GPUs.

Two layouts (`data_parallel(..., layout=)`, `memprof recommend --layout`):

    torch       (the default) what the torch code the plan prints allocates
                (memprof.plan.codegen):
                ddp, zero1: DDP over fp32 parameters, torch.autocast for fp16/bf16: fp32
                  weights (4 B / parameter) + fp32 gradients (4) + the optimizer's state in
                  fp32 (8 for Adam; zero1 = ZeroRedundancyOptimizer shards only this) + DDP's
                  bucket copy of the fp32 gradients (4), and autocast's half-precision weight
                  copies during forward (the single-GPU AMP step has them). zero1's share is
                  the largest rank's under ZeroRedundancyOptimizer's partition (whole
                  parameters, largest first, each to the rank with the fewest so far): the
                  rank that runs out first.
                zero2, zero3: FSDP2 fully_shard with MixedPrecisionPolicy(param_dtype=half,
                  reduce_dtype=fp32): fp32 parameter, gradient and optimizer-state shards
                  (4 + 4 + 8 over N), half-precision parameters of each all-gathered unit
                  (zero2: reshard_after_forward=False keeps them from forward to the unit's
                  backward), a unit's half gradients before its reduce-scatter, and the fp32
                  copy the reduce-scatter reduces.
    zero-paper  DeepSpeed's layout, the ZeRO paper's accounting (Rajbhandari et al. 2020):
                half-precision working weights and gradients (2 + 2 B), fp32 master weights +
                Adam's state (12 B), divided by each stage (1: the 12, 2: + the gradients,
                3: + the weights).

fp32 plans hold fp32 everything under both; FSDP's parameter shards are then its only
difference (the torch layout shards the parameters of zero2 too, as fully_shard does).
"""
from __future__ import annotations

from .cuda_autocast import LOW_PRECISION_DTYPES
from .errors import PlanInputError

__all__ = ["LAYOUTS", "DEFAULT_LAYOUT", "layout_name", "fsdp", "half_working_weights",
           "sharded", "gathered", "fp32_reduce", "optimizer_state_bytes",
           "bytes_per_parameter", "layout_note", "zero_model_state_bytes",
           "zero_redundancy_share", "optimizer_share"]

LAYOUTS = {
    "torch": "what the printed torch code allocates (DDP + autocast over fp32 weights; FSDP2 "
             "fully_shard with MixedPrecisionPolicy(param_dtype=half, reduce_dtype=fp32))",
    "zero-paper": "DeepSpeed's / the ZeRO paper's mixed-precision layout (2 + 2 + 12 bytes "
                  "per parameter, divided by each stage)",
}
DEFAULT_LAYOUT = "torch"

#: fp32 optimizer-state bytes per trainable parameter of the built-in optimizers
_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 4, "none": 0}


def layout_name(value) -> str:
    """A layout by name; one-line error otherwise."""
    name = str(value).strip().lower().replace("_", "-")
    if name not in LAYOUTS:
        raise PlanInputError(f"layout {value!r}: expected torch (what the printed code "
                             "allocates) or zero-paper (DeepSpeed's 2 + 2 + 12 bytes per "
                             "parameter)")
    return name


def fsdp(strategy) -> bool:
    """The strategies the printed code runs with FSDP2 fully_shard (the others: DDP)."""
    return "gradients" in strategy.shards


def half_working_weights(layout: str, strategy, precision: str) -> bool:
    """Does the rank compute with half-precision parameters (so half gradients)? zero-paper
    under fp16/bf16; torch only under FSDP2's param_dtype (DDP keeps fp32 under autocast)."""
    if precision not in LOW_PRECISION_DTYPES:
        return False
    return layout == "zero-paper" or fsdp(strategy)


def sharded(layout: str, strategy) -> frozenset:
    """What each rank holds 1/N of: the strategy's shards, and under torch every model state
    of fully_shard (it shards the parameters of zero2 too)."""
    if layout == "torch" and fsdp(strategy):
        return frozenset({"optimizer", "gradients", "parameters"})
    return strategy.shards


def gathered(layout: str, strategy) -> str | None:
    """How whole parameters are all-gathered: 'per-phase' (zero3: in forward and again in
    backward), 'forward-to-backward' (torch zero2: reshard_after_forward=False), or None."""
    if "parameters" in strategy.shards:
        return "per-phase"
    if layout == "torch" and fsdp(strategy):
        return "forward-to-backward"
    return None


def fp32_reduce(layout: str, strategy, precision: str) -> bool:
    """Does the gradient reduction run in fp32 over half gradients (FSDP2's reduce_dtype)?"""
    return layout == "torch" and half_working_weights(layout, strategy, precision)


def zero_redundancy_share(numels, world: int) -> float:
    """The largest rank's share of the parameters under torch's ZeroRedundancyOptimizer
    partition: parameters sorted by size (largest first), each to the rank holding the fewest
    elements so far (the lowest rank on a tie)."""
    loads = [0] * world
    for n in sorted(numels, reverse=True):
        loads[loads.index(min(loads))] += int(n)
    total = sum(loads)
    return max(loads) / total if total else 1.0 / world


def optimizer_share(layout: str, strategy, world: int, numels) -> float:
    """The part of the optimizer state (and its step's temporaries) one rank holds: 1/N where
    the layout shards it evenly (FSDP, the ZeRO paper), the largest rank's share of
    ZeroRedundancyOptimizer's partition for zero1 under torch, everything otherwise."""
    if "optimizer" not in sharded(layout, strategy):
        return 1.0
    if layout == "torch" and not fsdp(strategy):
        return zero_redundancy_share(numels, world)
    return 1.0 / world


def optimizer_state_bytes(optimizer) -> int | None:
    """fp32 bytes of optimizer state per trainable parameter (None: a custom optimizer)."""
    return _STATE_BYTES.get(optimizer.lower()) if isinstance(optimizer, str) else None


def bytes_per_parameter(layout: str, strategy, precision: str, world: int,
                        state: int | None, state_share: float | None = None) -> dict:
    """Bytes per parameter of each part on one rank (what the rules apply; `state`: fp32
    optimizer-state bytes per parameter, None when unknown; `state_share`: the rank's part of
    the optimizer state, default 1/N where it is sharded)."""
    half = half_working_weights(layout, strategy, precision)
    shards = sharded(layout, strategy)
    low = LOW_PRECISION_DTYPES.get(precision)
    low_b = low.itemsize if low is not None else 4
    master = 4 if layout == "zero-paper" and half else 0
    work = 2 if layout == "zero-paper" and half else 4
    parts = {"parameters": work, "gradients": work,
             "optimizer_state": None if state is None else master + state}
    for part, shard in (("parameters", "parameters"), ("gradients", "gradients"),
                        ("optimizer_state", "optimizer")):
        if shard in shards and parts[part] is not None:
            share = state_share if part == "optimizer_state" and state_share else 1 / world
            parts[part] = parts[part] * share
    if strategy.buckets:
        parts["ddp_buckets"] = work
        if layout == "torch" and low is not None:
            parts["autocast_weight_copies_in_forward"] = low_b
    if gathered(layout, strategy):
        parts["gathered_unit_parameters"] = low_b if half else work
    if fsdp(strategy):
        parts["unit_gradients_before_reduce_scatter"] = low_b if half else work
        parts["reduce_scatter_input"] = 4 if (half and layout == "torch") else work
    return {k: (round(v, 4) if v is not None else None) for k, v in parts.items()}


def layout_note(layout: str, strategy, precision: str, world: int, state: int | None,
                state_share: float | None = None) -> str:
    """Rule 1 as said in a plan's assumptions: the layout and its model states per parameter."""
    b = bytes_per_parameter(layout, strategy, precision, world, state, state_share)
    st = "the optimizer's state" if b["optimizer_state"] is None else \
        f"{b['optimizer_state']:g}"
    what = {("torch", False): "fp32 weights" + (" under autocast" if precision in
                                                LOW_PRECISION_DTYPES else ""),
            ("torch", True): "fp32 shards, half-precision compute (FSDP2 param_dtype)",
            ("zero-paper", False): "fp32 weights",
            ("zero-paper", True): "half weights + gradients, fp32 master weights + state"}[
        (layout, half_working_weights(layout, strategy, precision))]
    return (f"{layout} layout, {precision}: {what}; model states per parameter "
            f"{b['parameters']:g} + {b['gradients']:g} + {st} B (parameters + gradients + "
            "optimizer state)")


def zero_model_state_bytes(params: int, stage: int, world: int, k: int = 12) -> float:
    """Model-state bytes per rank in the ZeRO paper (Rajbhandari et al. 2020, Fig. 1):
    (2 + 2 + K) x params for fp16 weights, fp16 gradients and K bytes of optimizer state
    (K = 12 for mixed-precision Adam), stage 1 dividing K, 2 also the gradients, 3 all."""
    p, g, o = 2.0 * params, 2.0 * params, float(k) * params
    if stage >= 1:
        o /= world
    if stage >= 2:
        g /= world
    if stage >= 3:
        p /= world
    return p + g + o
