"""The code a plan for N GPUs prints (memprof.plan.codegen): the launch, the strategy's
wrapping and the global-batch learning rate - and that the printed scripts of all four
strategies run as they are, as one 2-rank gloo job on this CPU (tests/plan/codegen_ranks_job.py
runs each script as `python script.py` would)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

import memprof
from memprof.plan.distributed import data_parallel

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
# strategy -> (precision, accumulation): every wrapping, both half precisions, no_sync paths
CASES = {"ddp": ("fp32", 2), "zero1": ("fp16", 2), "zero2": ("bf16", 1), "zero3": ("bf16", 2)}


@pytest.fixture(scope="module")
def codes() -> dict[str, str]:
    """The printed script per strategy for the built-in MLP, global batch 8 on 2 GPUs, with
    the LR advice for base 1e-3 at batch 4 and a warmup."""
    out = {}
    for name, (precision, accumulation) in CASES.items():
        plan = memprof.recommend("mlp", gpu="a100-80gb", effective_batch=8, policies=["none"],
                                 precisions=[precision], confirm=False, workers=1,
                                 distributed=data_parallel(name, WORLD), base_lr=1e-3,
                                 base_batch=4, warmup_steps=4)
        option = next(o for o in plan.options if o.accumulation == accumulation)
        out[name] = plan.code(option)
    return out


def test_each_strategy_prints_its_launch_and_wrapping(codes):
    for name, code in codes.items():
        assert 'int(os.environ["LOCAL_RANK"])' in code, name
        assert 'dist.init_process_group("nccl" if device == "cuda" else "gloo")' in code, name
        assert "torchrun --nproc-per-node 2" in code and "DistributedSampler" in code, name
        assert "lr=0.002)" in code and "global batch 8" in code, name   # 1e-3 x 8 / 4
        assert code.rstrip().endswith("dist.destroy_process_group()"), name
        compile(code, name, "exec")
    assert "model = DDP(model, device_ids=" in codes["ddp"]
    assert "ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW" \
        in codes["zero1"] and "model = DDP(" in codes["zero1"]
    for name in ("ddp", "zero1"):   # accumulation 2: all-reduce once per optimizer step
        assert "model.no_sync()" in codes[name] and "fully_shard" not in codes[name]
    zero2, zero3 = codes["zero2"], codes["zero3"]
    assert "DDP" not in zero2 + zero3 and "no_sync" not in zero2 + zero3
    assert "fully_shard(block, reshard_after_forward=False, mp_policy=mp_policy)" in zero2
    assert "fully_shard(model, reshard_after_forward=False, mp_policy=mp_policy)" in zero2
    assert "fully_shard(block, reshard_after_forward=True, mp_policy=mp_policy)" in zero3
    assert "fully_shard(model, reshard_after_forward=True, mp_policy=mp_policy)" in zero3
    assert 'model.get_submodule(f"net.{i}") for i in (0, 3, 6)' in zero3   # the plan's units
    # sharded: the model stays on the CPU until fully_shard moves its shards (a 7B model moved
    # whole onto a 24 GB GPU first ran out of memory where the plan said its shards fit)
    for name in ("zero2", "zero3"):
        assert "model.to(device)" not in codes[name] and "fully_shard below" in codes[name]
    assert "model.to(device).train()" in codes["ddp"]


def test_a_single_gpu_plan_has_no_process_group():
    code = memprof.recommend("mlp", gpu="a100-80gb", effective_batch=8, policies=["none"],
                             precisions=["bf16"], confirm=False, workers=1).code()
    assert "dist." not in code and "DDP" not in code and "fully_shard" not in code


def _shard_rows(rows: int, rank: int) -> int:
    """Rows of dim 0 that FSDP2 gives `rank` (chunks of ceil(rows / world))."""
    chunk = math.ceil(rows / WORLD)
    return max(0, min(chunk, rows - rank * chunk))


@pytest.mark.slow   # one torchrun job of 2 ranks running the 4 scripts: ~25-40 s here
def test_printed_code_runs_as_a_2_rank_gloo_job(codes, tmp_path):
    scripts = []
    for name, code in codes.items():
        path = tmp_path / f"{name}.py"
        path.write_text(code)
        scripts.append(str(path))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(WORLD), os.path.join(HERE, "codegen_ranks_job.py"), str(tmp_path), *scripts],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    shapes = [tuple(p.shape) for p in memprof.models.build_model("mlp").model.parameters()]
    full = [math.prod(s) for s in shapes]
    for name in CASES:
        r0, r1 = (r[f"{name}.py"] for r in ranks)
        for facts in (r0, r1):
            assert facts["optimizer_steps"] == 2 and facts["finite_loss"], (name, facts)
        if name in ("ddp", "zero1"):
            assert r0["model"] == "DistributedDataParallel" and not r0["dtensor_parameters"]
            assert r0["local_numel"] == r1["local_numel"] == full
            # ranks began from different weights and batches: DDP made them agree
            assert r0["local_sum"] == pytest.approx(r1["local_sum"], rel=1e-6, abs=1e-6), name
        else:
            assert r0["dtensor_parameters"] and r0["model"].startswith("FSDP"), (name, r0)
            for rank, facts in enumerate((r0, r1)):
                assert facts["local_numel"] == [
                    _shard_rows(s[0], rank) * math.prod(s[1:]) for s in shapes], (name, rank)
    assert ranks[0]["zero1.py"]["optimizer"] == "ZeroRedundancyOptimizer"
    assert ranks[0]["ddp.py"]["optimizer"] == "AdamW"
