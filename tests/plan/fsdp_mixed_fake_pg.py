"""One rank of a real FSDP2 step with the printed code's mixed precision, under torch's fake
process group: what the "torch" layout of memprof.plan.distributed (zero2, zero3) is checked
against.

    python fsdp_mixed_fake_pg.py WORLD RESHARD_AFTER_FORWARD  ->  one JSON line

`fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32))` per
block and at the root, as memprof.plan.codegen prints it for bf16 (reshard_after_forward False:
zero2, True: zero3). Counting as tests/plan/fsdp_fake_pg.py does.
"""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.distributed.fake_pg import FakeStore

from fsdp_fake_pg import BATCH, LiveBytes, Net, batch, local_bytes, watch_fsdp_storage_resizes


def main(world: int, reshard_after_forward: bool) -> dict:
    """One rank's model-state bytes and the live-byte peak of a steady bf16 step."""
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    modes = []
    try:
        with watch_fsdp_storage_resizes(modes):
            return _steps(init_device_mesh("cpu", (world,)), modes, reshard_after_forward)
    finally:
        dist.destroy_process_group()


def _steps(mesh, modes, reshard_after_forward: bool) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.manual_seed(0)
        model = Net()
        for b in model.blocks:
            fully_shard(b, mesh=mesh, reshard_after_forward=reshard_after_forward,
                        mp_policy=policy)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward,
                    mp_policy=policy)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        out = {}
        for step in range(2):
            x, y = batch(BATCH)
            mode = LiveBytes()
            modes[:] = [mode]
            with mode:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = nn.functional.cross_entropy(model(*x), y)
                loss.backward()
                if step == 1:
                    out["gradients"] = local_bytes(p.grad for p in model.parameters())
                    out["parameters"] = local_bytes(model.parameters())
                opt.step()
                opt.zero_grad(set_to_none=True)
                del loss
            if step == 1:
                out["optimizer_state"] = local_bytes(
                    v for s in opt.state.values() for v in s.values())
                out["steady_peak_over_model_states"] = mode.peak
            modes.clear()
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), sys.argv[2] == "True")))
