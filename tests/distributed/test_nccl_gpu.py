"""The CUDA path: DDP over NCCL on one GPU (a 1-rank job in this process). Skipped without a
GPU: NCCL's completion callbacks and CUDA buckets cannot be exercised on the CPU build."""
from __future__ import annotations

import socket

import pytest
import torch

import memprof
from memprof.analyse import throughput


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.gpu
def test_ddp_nccl_bucket_and_allreduce_time_on_cuda(monkeypatch, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = DDP(torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                        torch.nn.Linear(512, 8)).cuda(), device_ids=[0])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with memprof.track(model, opt, path=str(tmp_path / "gpu.memprof")) as prof:
            for _ in range(3):
                model(torch.randn(32, 256, device="cuda")).square().mean().backward()
                opt.step()
                opt.zero_grad()
        params = sum(p.numel() * p.element_size() for p in model.parameters())
    finally:
        dist.destroy_process_group()
    assert prof.saved == str(tmp_path / "gpu.rank0.memprof")
    assert (prof.meta["rank"], prof.meta["world_size"], prof.meta["dist_backend"]) == \
        (0, 1, "nccl")
    # DDP's bucket holds every gradient once more (the caching allocator may round it up)
    assert prof.breakdown("category", at="end")["communication"] >= params
    comm = throughput.summarize(prof)["communication"]
    assert comm["by_op"]["all_reduce"]["calls"] == 3 and comm["incomplete_calls"] == 0
