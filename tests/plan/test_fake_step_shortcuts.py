"""The recording mode's two shortcuts past FakeTensorMode (device queries, `_unsafe_view`)
leave every estimate as it was: the same stream, peaks, FLOPs and op count."""
import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memprof.models import build_model
from memprof.plan import fake_step
from memprof.plan.batch_model import _op_names
from memprof.plan.estimate import Estimator


def _stream(est):
    p = est.profile
    return (p.memory["size"].tolist(), _op_names(p), p.category.tolist(), p.alloc_of.tolist())


def test_unsafe_view_gives_the_view_and_records_nothing_new():
    fm = FakeTensorMode()
    with fm:
        a = torch.randn(4, 6, 8)
        w = torch.randn(8, 5)
    storages = fake_step.StepStorages(torch.nn.Linear(1, 1))
    recorder = fake_step.RecordingMode(storages)
    bypassed = FakeTensorMode.cache_bypasses["unsafe view"]
    with fm, recorder:
        m = torch.mm(a.view(24, 8), w)
        live, ops = dict(storages.live), storages.ops
        u = torch.ops.aten._unsafe_view(m, [4, 6, 5])
        assert storages.ops == ops + 1 and storages.live == live   # no new storage recorded
        assert u.untyped_storage()._cdata == m.untyped_storage()._cdata
        assert (u.shape, u.stride(), u.storage_offset()) == ((4, 6, 5), (30, 5, 1), 0)
        assert not u._is_view()                 # autograd still saw `_unsafe_view`
        with pytest.raises(ValueError, match="Cannot view a tensor"):
            torch.ops.aten._unsafe_view(torch.randn(3, 4).t(), [12])
    # served from the fake cache: the bypass FakeTensorMode applies to `_unsafe_view` is gone
    assert FakeTensorMode.cache_bypasses["unsafe view"] == bypassed


def test_device_queries_are_answered_without_fake_tensor_mode(monkeypatch):
    seen = []
    dispatch = FakeTensorMode.dispatch

    def counting(self, func, types, args=(), kwargs=None):
        seen.append(func)
        return dispatch(self, func, types, args, kwargs)
    monkeypatch.setattr(FakeTensorMode, "dispatch", counting)
    wl = build_model("vit-tiny")
    est = Estimator(wl.model, wl.make_batch, wl.loss_fn, gpu="v100-16gb").step(
        2, precision="fp16")
    # the few left are asked while FakeTensorMode runs a kernel (the recording mode is off
    # the stack then); without the shortcut they are about 2/3 of all dispatches
    dispatched = est.profile.meta["estimate_ops"]
    assert seen.count(torch.ops.prim.device.default) < 0.02 * dispatched
    assert torch.ops.aten._unsafe_view.default not in seen
    # ... and still counted as ops: every dispatch the recording mode saw
    assert dispatched > 2 * len(seen) > 0


def test_the_launch_floor_counts_a_micro_steps_kernels_only():
    """The time model's floor (LAUNCH_S per op) counted every dispatch of the whole step:
    device queries (2/3 of them), views, the optimizer's first-step state - micro-batch 1 of
    a small model read 5x slower than its launches."""
    wl = build_model("mlp")
    adamw = Estimator(wl.model, wl.make_batch, wl.loss_fn, gpu="v100-16gb").step(1)
    sgd = Estimator(wl.model, wl.make_batch, wl.loss_fn, optimizer="sgd",
                    gpu="v100-16gb").step(1)
    assert adamw.ops == sgd.ops                            # no optimizer kernel in it
    assert adamw.ops < 0.3 * adamw.profile.meta["estimate_ops"]
    # 3 linear layers and 2 ReLUs: forward and backward launch a few dozen kernels
    assert 10 <= adamw.ops <= 60


@pytest.mark.parametrize("precision,policy", [("fp32", "none"), ("fp16", "every")])
def test_estimate_is_the_same_without_the_shortcuts(monkeypatch, precision, policy):
    wl = build_model("vit-tiny")
    est = Estimator(wl.model, wl.make_batch, wl.loss_fn, gpu="v100-16gb")
    fast = est.step(3, precision=precision, checkpointing=policy)
    monkeypatch.setattr(fake_step, "_PRIM_DEVICE", object())    # never matches an op
    monkeypatch.setattr(fake_step, "_UNSAFE_VIEW", object())
    plain = est.step(3, precision=precision, checkpointing=policy)
    assert _stream(fast) == _stream(plain)
    assert {k: v for k, v in fast.as_dict().items() if k != "wall_s"} == \
        {k: v for k, v in plain.as_dict().items() if k != "wall_s"}
    assert np.array_equal(fast.profile.memory["size"], plain.profile.memory["size"])
