"""The time model of a training step on a GPU you may not have (an estimate, not a measurement).

Time of a micro-step = counted FLOPs (incl. recompute) / (peak FLOP/s of the precision x
UTILISATION[precision]) + bytes moved / (bandwidth x BANDWIDTH_UTILISATION), where bytes moved =
2 x bytes allocated in forward and backward (each new tensor written once and read at least
once) + 3 x parameter bytes (weights read in forward and backward, gradients written); at least
LAUNCH_S per kernel the micro-step launches (its forward and backward ops but views, device
queries and bare allocations: counting every dispatch of the whole step made small micro-batches
read 5x too slow). An optimizer step moves 3 x (parameters + gradients + optimizer
state). The utilisation figures are stated assumptions (typical of large training GEMMs), not
measurements: use them to rank, and measure the chosen configuration.
"""
from __future__ import annotations

__all__ = ["UTILISATION", "BANDWIDTH_UTILISATION", "LAUNCH_S", "micro_step_time",
           "optimizer_time"]

#: share of the precision's peak FLOP/s that the counted FLOPs are assumed to run at
UTILISATION = {"fp32": 0.6, "tf32": 0.5, "fp16": 0.4, "bf16": 0.4}
#: share of the memory bandwidth that the bytes moved are assumed to run at
BANDWIDTH_UTILISATION = 0.7
#: lower bound on the time per kernel launched (launch and Python overhead), seconds
LAUNCH_S = 5e-6


def _flops_rate(gpu, precision: str) -> float | None:
    try:
        peak = gpu.peak_flops(precision)
    except Exception:  # noqa: BLE001
        peak = None
    if peak is None:
        return None
    return peak * UTILISATION.get(precision, 0.4)


def micro_step_time(pred, gpu, precision: str, params_bytes: int) -> float | None:
    """Seconds of one forward + backward predicted by `pred` (a Prediction); None when the
    GPU's FLOP/s or bandwidth are unknown."""
    rate = _flops_rate(gpu, precision)
    if rate is None or not gpu.bandwidth:
        return None
    t_flops = pred.flops / rate
    moved = 2 * pred.bytes_allocated + 3 * params_bytes
    t_mem = moved / (gpu.bandwidth * BANDWIDTH_UTILISATION)
    return max(t_flops + t_mem, pred.ops * LAUNCH_S)


def optimizer_time(gpu, params_bytes: int, trainable: int, state_bytes: int) -> float:
    """Seconds of one optimizer step (fp32 gradients of the trainable parameters)."""
    if not gpu.bandwidth:
        return 0.0
    moved = 3 * (params_bytes + 4 * trainable + state_bytes)
    return moved / (gpu.bandwidth * BANDWIDTH_UTILISATION)
