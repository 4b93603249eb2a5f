"""benchmarks/estimate_on_gpu.py: memprof's estimates against the same steps on a real GPU.
Without one it refuses in one line; with one, the quick cases must land near the allocator."""
from __future__ import annotations

import json

import pytest
import torch
from benchmark_scripts import load

estimate_on_gpu = load("estimate_on_gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_without_a_gpu_it_says_so_and_fails(capsys):
    assert estimate_on_gpu.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_quick_estimates_land_near_the_caching_allocators_peak(tmp_path):
    out = tmp_path / "est"
    assert estimate_on_gpu.main(["--quick", "--timed-steps", "2", "--out", str(out)]) == 0
    saved = json.loads((tmp_path / "est.json").read_text())
    rows = saved["rows"]
    assert {r["model"] for r in rows} == set(estimate_on_gpu.QUICK)
    for r in rows:
        assert r["measured_peak"] > 0 and r["measured_step_ms"] > 0
        assert abs(r["peak_error"]) < 0.15, r
        assert abs(r["steady_error"]) < 0.15, r
