"""`memprof.recommend(model=...)` of a model whose own forward enters `torch.autocast(...,
dtype=torch.bfloat16)` (research code, nanoGPT-style models). Every estimate ran that
autocast: the 'fp32' row computed bf16 and gave bf16's bytes beside a bf16 row that was the
same step, and on a V100 (no bf16) the model's bf16 was offered as 'fp32' with no word of it;
a `torch.autocast("cuda", ...)` did nothing on the CPU fake tensors, so its part was estimated
in fp32. The plan now says which module sets the precision, keeps one row for the precisions
the model overrides, warns on a GPU without bf16, and a cuda autocast is estimated as one."""
import pytest
import torch
from torch import nn

import memprof
from memprof.plan.estimate import Estimator

pytestmark = pytest.mark.usefixtures("collect_garbage_after")

WIDTH = 128


class OwnBf16(nn.Module):
    """The whole forward under the bf16 autocast it enters itself."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.ReLU(),
                                  nn.Linear(4 * WIDTH, 10))

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.body(x).float()


class Head(nn.Module):
    def __init__(self, device_type):
        super().__init__()
        self.proj = nn.Linear(4 * WIDTH, 10)
        self.device_type = device_type

    def forward(self, x):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.proj(x).float()


class OwnHeadBf16(nn.Module):
    """Only its head under the model's own bf16 autocast (written for the GPU: "cuda")."""

    def __init__(self, device_type="cuda"):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.ReLU())
        self.head = Head(device_type)

    def forward(self, x):
        return self.head(self.body(x))


def _batch(b):
    return (torch.randn(b, WIDTH),), torch.randint(0, 10, (b,))


def _plan(model, gpu):
    torch.manual_seed(0)
    return memprof.recommend(model=model, batch=_batch, gpu=gpu, effective_batch=64,
                             policies=["none"], workers=1)


def _own_notes(plan):
    return [n for n in plan.notes() if "sets its own precision" in n]


def test_a_forward_that_sets_its_precision_is_one_row_named_in_a_note():
    plan = _plan(OwnBf16(), "a100-40gb")
    assert {o.precision for o in plan.options} == {"bf16"}
    own = _own_notes(plan)
    assert len(own) == 1 and "OwnBf16" in own[0] and "bf16" in own[0] and "\n" not in own[0]
    skipped = {c.precision: c.skipped for c in plan.combinations}
    assert skipped["bf16"] is None
    assert "would compute as the bf16 row" in skipped["fp32"] and skipped["fp16"]
    assert plan.as_dict()["notes"] == plan.notes(plan.best)


def test_on_a_gpu_without_bf16_the_models_own_bf16_is_warned_of():
    plan = _plan(OwnBf16(), "v100-16gb")
    assert {o.precision for o in plan.options} == {"fp32"}   # the model as it runs
    assert len(_own_notes(plan)) == 1
    warned = [n for n in plan.notes() if "will not run at bf16 speed" in n]
    assert len(warned) == 1 and warned[0].startswith("v100-16gb has no bf16"), plan.notes()


def test_an_own_autocast_over_a_part_keeps_the_rows_and_names_the_module():
    plan = _plan(OwnHeadBf16(), "a100-40gb")
    assert {o.precision for o in plan.options} == {"fp32", "fp16", "bf16"}
    own = _own_notes(plan)
    assert len(own) == 1 and "head (Head) enters torch.autocast(dtype=bf16)" in own[0], own


def test_a_cuda_autocast_in_the_forward_is_estimated_as_one():
    """(on CPU fake tensors a cuda autocast is off: its part was estimated in fp32)"""
    torch.manual_seed(0)
    made = {}   # bytes the forward and backward allocate (the head's bf16 copies among them)
    for device in ("cuda", "cpu"):
        est = Estimator(OwnHeadBf16(device), _batch, gpu="a100-40gb").step(8)
        made[device] = est.bytes_allocated
        assert est.own_autocast["precision"] == "bf16"
    plain = Estimator(nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.ReLU(),
                                    nn.Linear(4 * WIDTH, 10)), _batch, gpu="a100-40gb").step(8)
    assert made["cuda"] == made["cpu"] != plain.bytes_allocated
    assert plain.own_autocast is None
