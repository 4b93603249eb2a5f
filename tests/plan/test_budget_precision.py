"""A budget replay against a GPU that cannot run the run's precision (bf16 on a V100 or T4):
flagged, with what would run there instead - fp16 with GradScaler or fp32, estimated - whether
the recorded step fits or not (it failed with "precision 'bf16': v100-16gb has no bf16 hardware
support" and gave no advice)."""
import dataclasses

import torch

import memprof
from memprof.plan.gpus import lookup

MIB = 1 << 20
WIDTH = 256


def _train(batch: int, budget, dtype=None, autocast=torch.bfloat16):
    """Two AdamW steps of a small MLP under CPU autocast (or built in `dtype`), tracked."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(),
                                torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(),
                                torch.nn.Linear(WIDTH, 10))
    model = model.to(dtype) if dtype is not None else model
    opt = torch.optim.AdamW(model.parameters())
    with memprof.track(model, opt, budget=budget) as prof:
        for _ in range(2):
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                x = torch.randn(batch, WIDTH, dtype=dtype or torch.float32)
                loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (batch,)))
            loss.backward()
            opt.step()
            opt.zero_grad()
    return prof


def _precision_findings(prof):
    return [f for f in prof.findings if f.kind == "budget" and "no bf16" in f.message]


def test_a_bf16_run_that_fits_a_v100_is_flagged_and_re_estimated_in_what_runs_there():
    prof = _train(64, "v100-16gb")
    b = prof.meta["budget"]
    assert b["fits"]
    assert b["precision"]["run"] == "bf16" and b["precision"]["source"] == "autocast"
    assert not b["precision"]["supported"] and "GradScaler" in b["precision"]["text"]
    [finding] = _precision_findings(prof)
    assert finding.severity == "warning" and "fp32" in finding.message
    est = prof.meta["fit"]["estimate"]
    assert prof.meta["fit"]["scaled"] is None          # the recorded step fits as it is
    fitting = [o for o in est["options"] if o["fits"]]       # a small MLP on 16 GB
    assert {(o["precision"], o["checkpointing"], o["micro_batch"]) for o in fitting} == \
        {("fp16", "none", 64), ("fp32", "none", 64)}
    assert "cannot run there; in fp16" in est["current"]["text"]
    assert any("no bf16" in n for n in est["notes"])


def test_a_bf16_run_too_big_for_a_v100_gets_fp16_and_fp32_advice():
    small_v100 = dataclasses.replace(lookup("v100-16gb"), memory_bytes=730 * MIB)
    prof = _train(16384, small_v100)
    assert not prof.meta["budget"]["fits"]
    fit = prof.meta["fit"]
    assert fit["note"] is None, fit["note"]        # was: re-estimating failed: PlanInputError
    options = fit["estimate"]["options"]
    assert {o["precision"] for o in options} == {"fp16", "fp32"}
    fitting = [o for o in options if o["fits"]]
    assert {o["precision"] for o in fitting} == {"fp16", "fp32"}
    assert all(o["micro_batch"] * o["accumulation"] == 16384 for o in fitting)
    assert all(o["peak_reserved"] <= fit["estimate"]["capacity"] for o in fitting)


def test_bf16_weights_on_a_t4_are_flagged_and_estimated_converted_to_fp16():
    prof = _train(64, "t4", dtype=torch.bfloat16, autocast=None)
    p = prof.meta["budget"]["precision"]
    assert (p["run"], p["source"], p["supported"]) == ("bf16", "weights", False)
    assert "weights converted" in p["text"]
    assert _precision_findings(prof)
    est = prof.meta["fit"]["estimate"]
    assert {o["precision"] for o in est["options"]} == {"fp16"}   # fp32 is another model
    assert any(o["fits"] for o in est["options"])


def test_a_gpu_with_bf16_or_a_byte_budget_says_nothing_about_precision():
    a100 = _train(64, "a100-40gb")
    assert a100.meta["budget"]["precision"]["supported"] and not _precision_findings(a100)
    assert "fit" not in a100.meta
    assert _train(64, 512 * MIB).meta["budget"]["precision"] is None
