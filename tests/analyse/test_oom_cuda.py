"""A real CUDA out-of-memory error, diagnosed (skipped without a GPU)."""
import pytest
import torch

import memprof

pytestmark = pytest.mark.gpu


def test_cuda_oom_diagnosis_reports_reserved_capacity_and_the_module(capfd):
    total = torch.cuda.get_device_properties(0).total_memory

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(1024, 1024)

        def forward(self, x):
            y = self.proj(x)
            return y + torch.empty(total, dtype=torch.uint8, device=x.device).sum()

    model = Net().cuda()
    x = torch.randn(64, 1024, device="cuda")
    with pytest.raises(torch.OutOfMemoryError) as excinfo:
        with memprof.track(model) as prof:
            model(x)
    assert "out of memory" in str(excinfo.value).lower()
    [f] = [f for f in prof.findings if f.kind == "out_of_memory"]
    d = f.evidence
    assert d["request"]["device"] == "cuda" and d["request"]["requested"] >= total
    assert d["request"]["module"] == "Net" and d["request"]["phase"] == "forward"
    assert d["memory"]["capacity"] == total
    assert d["memory"]["capacity_source"].startswith("CUDA device")
    assert d["memory"]["reserved"] >= d["memory"]["allocated"] > 0
    assert d["cause"]["cause"] == "single_request"
    assert d["alive"]["by_category"]["parameters"] == 1024 * 1024 * 4 + 1024 * 4
    assert "Out of memory: why" in capfd.readouterr().err


def test_budget_replay_of_a_cuda_recorded_run():
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(),
                                torch.nn.Linear(2048, 10)).cuda()
    opt = torch.optim.Adam(model.parameters())
    with memprof.track(model, opt, budget="v100-16gb") as prof:
        for _ in range(3):
            model(torch.randn(256, 512, device="cuda")).sum().backward()
            opt.step()
            opt.zero_grad()
    b = prof.meta["budget"]
    assert prof.device == "cuda" and b["fits"] and b["projection"] is None
    # the replay of the allocator's own block sizes reserves at least what was allocated
    assert b["peak_reserved"] >= b["peak_allocated"] >= prof.peak
