"""Communication time of a data-parallel step over the GPU table's interconnect: a MODEL.

Bytes each rank puts on the wire per collective (ring algorithms, NCCL's bus-bandwidth
accounting; S = the full tensor's bytes, N = world size): all-reduce 2 (N-1)/N x S, all-gather
and reduce-scatter (N-1)/N x S. Bandwidth: on one node the GPU's link (`gpus.GPU.link`:
NVLink or PCIe), across nodes the slower of it and the per-GPU network (`gpus.GPU.network`,
InfiniBand), times `COMM_UTILISATION` (a stated assumption, not a measurement).

Collectives per optimizer step of A micro-steps (see `memprof.plan.distributed`):

    ddp    all-reduce of the gradients once (no_sync() on micro-steps 1..A-1), overlapped
           with the last micro-step's backward
    zero1  the same, plus an all-gather of the updated parameters after the optimizer step
           (under the "torch" layout ZeroRedundancyOptimizer's broadcasts, the same bytes)
    zero2  a reduce-scatter of the gradients every micro-step (overlapped with backward),
           plus the all-gather of the updated parameters after the optimizer step (DeepSpeed,
           "zero-paper"); under "torch" FSDP2 reshards after backward, so it all-gathers the
           parameters in forward every micro-step instead (overlapped with forward)
    zero3  every micro-step: an all-gather of the parameters in forward (overlapped with
           forward) and again in backward, and a reduce-scatter of the gradients (both
           overlapped with backward)

The bytes are the caller's (`RankEstimator.communication`): under "torch" DDP's gradients and
ZeroRedundancyOptimizer's parameters are fp32, FSDP2 all-gathers half-precision parameters and
reduce-scatters in fp32; under "zero-paper" both move in the working precision.

Overlap: communication hides behind the compute of the phase it overlaps; what exceeds that
phase's time is exposed (the step waits for it). Not modelled: the first all-gather and the
last bucket's reduction, which cannot overlap (so this is a lower bound on exposed time),
NCCL latency per message, contention between compute and communication kernels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["COMM_UTILISATION", "Collective", "StepCommunication", "step_communication",
           "link_bandwidth"]

#: share of the link's bandwidth a large NCCL collective is assumed to reach
COMM_UTILISATION = 0.8


@dataclass
class Collective:
    name: str                 # "all-reduce gradients", ...
    overlaps: str             # "forward" | "backward" | "none"
    per: str                  # "micro-step" | "optimizer step"
    tensor_bytes: int         # S: the full tensor's bytes
    wire_bytes: int           # what each rank sends
    seconds: float            # wire_bytes / effective bandwidth


@dataclass
class StepCommunication:
    """Communication of one optimizer step on one rank (a model)."""
    collectives: list
    bandwidth: float          # effective bytes/s used
    link: str                 # e.g. "nvlink3 300 GB/s" or "network 25 GB/s (2 nodes)"
    total_s: float            # all collectives of one optimizer step
    exposed_s: float          # the part that does not hide behind compute

    def as_dict(self) -> dict:
        return asdict(self)


def link_bandwidth(gpu, nodes: int) -> tuple[float, str] | None:
    """(effective bytes/s, description) of the ranks' slowest link; None: not in the table."""
    if gpu.link is None:
        return None
    bw, what = gpu.link, f"{gpu.link_kind} {gpu.link / 1e9:g} GB/s"
    if nodes > 1:
        if gpu.network is None:
            return None
        if gpu.network < bw:
            bw, what = gpu.network, f"network {gpu.network / 1e9:g} GB/s per GPU"
        what += f", {nodes} nodes"
    return bw * COMM_UTILISATION, what


def _collective(name, overlaps, per, nbytes, factor, bw) -> Collective:
    wire = int(factor * nbytes)
    return Collective(name, overlaps, per, int(nbytes), wire, wire / bw)


def step_communication(dist, gpu, *, param_bytes: int, grad_bytes: int, accumulation: int,
                       forward_s: float, backward_s: float) -> StepCommunication | None:
    """The collectives of one optimizer step on one rank and how much of them is exposed.
    param_bytes / grad_bytes: the full parameters / gradients as communicated (working
    precision); forward_s / backward_s: compute time of one micro-step's phases. None when the
    GPU's interconnect is unknown or there is one rank."""
    n = dist.world_size
    link = link_bandwidth(gpu, dist.nodes)
    if link is None or n < 2:
        return None
    bw, what = link
    ring, half = 2 * (n - 1) / n, (n - 1) / n
    stage = dist.strategy.zero_stage
    torch_layout = dist.layout == "torch"
    cs = []
    if stage <= 1:
        cs.append(_collective("all-reduce gradients", "backward", "optimizer step",
                              grad_bytes, ring, bw))
    else:
        cs.append(_collective("reduce-scatter gradients", "backward", "micro-step",
                              grad_bytes, half, bw))
    if stage == 1 and torch_layout:
        cs.append(_collective("broadcast updated parameters", "none", "optimizer step",
                              param_bytes, half, bw))
    elif stage in (1, 2) and not torch_layout:
        cs.append(_collective("all-gather updated parameters", "none", "optimizer step",
                              param_bytes, half, bw))
    if stage == 2 and torch_layout:
        cs.append(_collective("all-gather parameters (forward)", "forward", "micro-step",
                              param_bytes, half, bw))
    if stage == 3:
        cs.append(_collective("all-gather parameters (forward)", "forward", "micro-step",
                              param_bytes, half, bw))
        cs.append(_collective("all-gather parameters (backward)", "backward", "micro-step",
                              param_bytes, half, bw))
    exposed = total = 0.0
    for phase, compute in (("forward", forward_s), ("backward", backward_s)):
        micro = sum(c.seconds for c in cs if c.overlaps == phase and c.per == "micro-step")
        once = sum(c.seconds for c in cs if c.overlaps == phase and c.per != "micro-step")
        total += accumulation * micro + once
        # per micro-step collectives hide behind each micro-step's phase; once-per-step ones
        # behind the last micro-step's (what that micro-step's own collectives left free)
        exposed += accumulation * max(0.0, micro - compute) + max(
            0.0, once - max(0.0, compute - micro))
    after = sum(c.seconds for c in cs if c.overlaps == "none")
    return StepCommunication(cs, bw, what, total + after, exposed + after)
