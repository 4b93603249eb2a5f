"""A plan's precisions follow the model's own weights and the GPU (memprof.plan.precision):
a model built in fp16 trains in fp16 as built (its printed code runs: no GradScaler, which
cannot unscale fp16 gradients), bf16 weights on a GPU without bf16 are converted to fp16,
and fp16 for a T5 says that T5 overflows fp16."""
import os

import pytest
import torch

import memprof
from memprof.plan.errors import PlanInputError

HERE = os.path.dirname(__file__)


@pytest.fixture(autouse=True)
def _factories_importable(monkeypatch):
    monkeypatch.syspath_prepend(HERE)    # the plan's code imports half_models


def _plan(model, batch, gpu="v100-16gb", **kw):
    kw = {"effective_batch": 32, "policies": ["none"], "confirm": False, "workers": 1} | kw
    return memprof.recommend(model=f"half_models:{model}", batch=f"half_models:{batch}",
                             gpu=gpu, **kw)


def _run(code: str) -> dict:
    """The plan's code, run here on the CPU (it falls back to the CPU without a GPU)."""
    ns = {"__name__": "plan_code"}
    exec(compile(code, "<plan code>", "exec"), ns)
    return ns


def _statements(code: str) -> str:
    """The code without its comment lines (the notes name GradScaler and autocast)."""
    return "\n".join(ln for ln in code.splitlines() if not ln.lstrip().startswith("#"))


def _changed(model, fresh) -> bool:
    return any(not torch.equal(a.float(), b.float())
               for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_a_model_built_in_fp16_trains_in_fp16_and_its_code_runs():
    import half_models
    plan = _plan("mlp_fp16", "batch_fp16")
    # one precision, the model's own: no "fp32" row that was fp16 compute timed as fp32
    assert {o.precision for o in plan.options} == {"fp16"}
    assert plan.model_precision.weights == "fp16" and plan.as_dict()["weights_precision"] == "fp16"
    how = plan.training("fp16")
    assert not how.autocast and not how.grad_scaler and how.convert is None
    code = plan.code()
    assert "GradScaler" not in _statements(code) and "autocast" not in _statements(code)
    assert any("no GradScaler" in n and "fp32" in n for n in plan.notes())   # said plainly
    ns = _run(code)          # with GradScaler: "Attempting to unscale FP16 gradients."
    assert all(p.dtype == torch.float16 for p in ns["model"].parameters())
    assert _changed(ns["model"], half_models.mlp_fp16())
    with pytest.raises(PlanInputError, match="weights are fp16"):
        _plan("mlp_fp16", "batch_fp16", precisions=["fp32"])
    with pytest.raises(ValueError, match="weights are fp16"):
        plan.predict(4, precision="fp32")


def test_bf16_weights_on_a_gpu_without_bf16_are_converted_to_fp16():
    import half_models
    plan = _plan("llama_lora_bf16", "tokens", effective_batch=4)
    assert {o.precision for o in plan.options} == {"fp16"}      # not "fp32" over bf16 compute
    assert any("v100-16gb has no bf16" in n for n in plan.notes())
    how = plan.training("fp16")
    assert how.convert == ("bf16", "fp16") and how.autocast and how.grad_scaler  # fp32 adapters
    code = plan.code()
    assert "t.data = t.data.to(torch.float16)" in code and "GradScaler" in code
    ns = _run(code)
    dtypes = {n: p.dtype for n, p in ns["model"].named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.float16}
    assert _changed(ns["model"], half_models.llama_lora_bf16())
    # the estimate is the converted model's: the same as estimating the model the code trains
    converted = half_models.llama_lora_bf16()
    for t in list(converted.parameters()) + list(converted.buffers()):
        if t.dtype == torch.bfloat16:
            t.data = t.data.to(torch.float16)
    direct = memprof.estimate.Estimator(converted, half_models.tokens, gpu="v100-16gb").step(
        4, precision="fp16")
    assert plan.predict(4, precision="fp16").peak_allocated == direct.peak("steady")
    with pytest.raises(PlanInputError, match="no bf16 hardware support"):
        _plan("llama_lora_bf16", "tokens", effective_batch=4, precisions=["bf16"])


def test_a_pure_bf16_model_on_a_t4_trains_converted_as_built():
    import half_models
    plan = _plan("mlp_bf16", "batch_bf16", gpu="t4")
    assert {o.precision for o in plan.options} == {"fp16"}
    how = plan.training("fp16")
    assert how.convert == ("bf16", "fp16") and not how.autocast and not how.grad_scaler
    ns = _run(plan.code())        # the bf16 batch is converted with the weights
    assert {p.dtype for p in ns["model"].parameters()} == {torch.float16}
    assert _changed(ns["model"], half_models.mlp_bf16())
    # on a GPU with bf16 the model trains in bf16 as built
    a100 = _plan("mlp_bf16", "batch_bf16", gpu="a100-40gb")
    assert {o.precision for o in a100.options} == {"bf16"}
    assert "autocast" not in _statements(a100.code()) and "t.data" not in a100.code()


def test_fp16_for_t5_carries_the_overflow_caveat(capsys):
    plan = _plan("t5", "t5_batch", effective_batch=1024)
    assert plan.best.precision == "fp16"          # fastest on a V100 (no bf16 there)
    [note] = [n for n in plan.notes() if "T5" in n]
    assert "overflow fp16" in note and "bf16" in note
    assert f"# note: {note}" in plan.code()
    plan.print()
    assert "T5's activations overflow" in capsys.readouterr().out
    assert plan.as_dict()["notes"] == plan.notes()
    fp32 = next(o for o in plan.options if o.precision == "fp32")
    assert not any("T5" in n for n in plan.notes(fp32))      # fp32: nothing to say
    mlp = memprof.recommend("mlp", gpu="v100-16gb", effective_batch=8, precisions=["fp16"],
                            policies=["none"], confirm=False, workers=1)
    assert not any("overflow" in n for n in mlp.notes())


def test_fp32_of_a_frozen_bf16_base_is_refused_where_the_gpu_has_no_bf16():
    """Asked for fp32, fp32 adapters over a frozen bf16 base ran the base in bf16 as built -
    on a V100, which has none (estimated in bf16, timed as fp32, no note)."""
    import torch
    from memprof.plan.errors import PlanInputError
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    model[1].float()
    with pytest.raises(PlanInputError, match="which v100-16gb does not compute in"):
        memprof.recommend(model, gpu="v100-16gb", effective_batch=4, input_shape=(64,),
                          num_classes=4, precisions=["fp32"], policies=["none"],
                          confirm=False, workers=1)
