"""The recording mode's own cache in front of FakeTensorMode (memprof.plan.fake_op_cache):
the same estimates as without it, and each kind of op it answers gives what FakeTensorMode
would."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from memprof.models import build_model
from memprof.plan import fake_step
from memprof.plan.batch_model import _op_names
from memprof.plan.estimate import Estimator
from memprof.plan.fake_op_cache import FakeOpCache


def _recording(fm):
    storages = fake_step.StepStorages(torch.nn.Linear(1, 1))
    cache = FakeOpCache(fm)
    return fake_step.RecordingMode(storages, op_cache=cache), cache


def _stream(est):
    """(size, op, category) of every event; a run of frees with nothing between them in
    sorted order: autocast's weight cache frees its copies at the forward's end in the order
    of a hash map of tensor addresses, which differs from run to run with or without a cache"""
    p = est.profile
    events = list(zip(p.memory["size"].tolist(), _op_names(p), p.category.tolist()))
    out, run = [], []
    for e in events + [(1, "", "")]:
        if e[0] < 0:
            run.append(e)
            continue
        out += sorted(run) + [e]
        run = []
    return out[:-1]


def _meta(t):
    return (t.shape, t.stride(), t.storage_offset(), t.dtype, t.untyped_storage().nbytes())


@pytest.mark.parametrize("precision,policy", [("fp32", "none"), ("fp16", "every"),
                                              ("bf16", "selective")])
def test_estimate_is_the_same_without_the_cache(precision, policy):
    wl = build_model("vit-tiny")
    est = Estimator(wl.model, wl.make_batch, wl.loss_fn, gpu="v100-16gb")
    cache = est.op_cache
    for batch in (2, 3):
        est.op_cache = None
        plain = est.step(batch, precision=precision, checkpointing=policy)
        est.op_cache = cache
        for _ in range(2):      # the cache cold for this batch size, then warm
            cached = est.step(batch, precision=precision, checkpointing=policy)
            assert _stream(cached) == _stream(plain)
            assert {k: v for k, v in cached.as_dict().items() if k != "wall_s"} == \
                {k: v for k, v in plain.as_dict().items() if k != "wall_s"}
    # the blocks repeat: most ops are answered by the cache; a step seen before, all of them
    assert cache.hits > cache.misses > 0
    misses, hits = cache.misses, cache.hits
    est.step(2, precision=precision, checkpointing=policy)
    assert cache.misses == misses and cache.hits > hits


def test_each_kind_of_op_answers_like_fake_tensor_mode():
    fm = FakeTensorMode()
    with fm:
        x = torch.randn(4, 6)
        y = torch.randn(4, 6)
        params = [torch.randn(3), torch.randn(5, 2)]
    recorder, cache = _recording(fm)
    with fm, recorder:
        first = (torch.mm(x, y.t()), x.t(), torch.native_layer_norm(x, [6], None, None, 1e-5),
                 torch._foreach_sqrt(params))
        misses = cache.misses
        mm, t, ln, roots = (torch.mm(y, x.t()), y.t(), torch.native_layer_norm(
            y, [6], None, None, 1e-5), torch._foreach_sqrt(params))
        assert cache.misses == misses and cache.hits >= 5
        # a new output: own storage, same metadata as the first call's
        assert type(mm) is FakeTensor and _meta(mm) == _meta(first[0])
        assert mm.untyped_storage()._cdata not in (x.untyped_storage()._cdata,
                                                   y.untyped_storage()._cdata)
        assert mm.fake_device == first[0].fake_device and mm.constant is None
        assert mm.__dict__.keys() == first[0].__dict__.keys()
        # a view: on its input's storage
        assert t.untyped_storage()._cdata == y.untyped_storage()._cdata and _meta(t) == _meta(
            first[1])
        assert type(ln) is tuple and [_meta(o) for o in ln] == [_meta(o) for o in first[2]]
        assert type(roots) is type(first[3]) and [_meta(o) for o in roots] == [
            _meta(o) for o in first[3]]
        # a list of views: each on the input's storage, the first call's metadata
        parts, halves = torch.unbind(x, 1), torch.split(y, 3, dim=1)
        misses = cache.misses
        for again, first_call in ((torch.unbind(y, 1), parts), (torch.split(x, 3, dim=1), halves)):
            assert [_meta(v) for v in again] == [_meta(v) for v in first_call]
            assert all(type(v) is FakeTensor for v in again)
        assert cache.misses == misses
        assert {v.untyped_storage()._cdata for v in torch.unbind(y, 1)} == {
            y.untyped_storage()._cdata}
        # in place: the argument itself, or nothing for the foreach ops
        assert torch.ops.aten.add_.Tensor(x, y) is x
        assert torch.ops.aten.add_.Tensor(y, x) is y
        add = torch.ops.aten._foreach_add_.Scalar
        assert add(params, 1.0) is None
        hits = cache.hits
        assert add(params, 1.0) is None and cache.hits == hits + 1
        assert _meta(params[1]) == ((5, 2), (2, 1), 0, torch.float32, 40)


def test_an_in_place_op_that_changes_its_argument_is_never_answered():
    fm = FakeTensorMode()
    with fm:
        a, b = torch.randn(4, 6), torch.randn(4, 6)
        e, f, g = torch.randn(5), torch.randn(5), torch.randn(5)
    recorder, cache = _recording(fm)
    with fm, recorder:
        a.resize_(3, 2)
        b.resize_(3, 2)          # same key as the first call: must run, not be answered
        e.set_(g)
        f.set_(g)
    assert a.shape == b.shape == (3, 2)
    assert e.untyped_storage()._cdata == f.untyped_storage()._cdata == \
        g.untyped_storage()._cdata
    assert cache.hits == 0


def test_data_dependent_ops_and_constants_go_to_fake_tensor_mode():
    fm = FakeTensorMode()
    with fm:
        x = torch.randn(8)
    recorder, cache = _recording(fm)
    with fm, recorder:
        c = torch.tensor(2.0)                  # a scalar: FakeTensorMode keeps its value
        assert c.constant is not None
        c + c
        assert (c + c).item() == 4.0 and torch.tensor(3).item() == 3
        with pytest.raises(Exception):         # no constant: FakeTensorMode raises
            x.sum().item()
        with pytest.raises(Exception):         # dynamic output shape: FakeTensorMode raises
            torch.nonzero(x)
    assert cache.hits == 0


def _lifted_constants(fm, cache_hits_before=None):
    """The optimizer's step-counter pattern on lifted scalars, as seen by FakeTensorMode's
    constant machinery: values, identity under in-place ops, views sharing the storage, and a
    write of a non-constant invalidating the constant (and its views')."""
    x = torch.randn(())
    steps = [torch.tensor(0.0) for _ in range(3)]
    seen = []
    for s in steps:
        assert isinstance(s, FakeTensor) and s.constant is not None and s.item() == 0.0
    torch._foreach_add_(steps, 1.0)
    seen.append([s.item() for s in steps])
    same = steps[0].add_(2.0)
    seen.append((same is steps[0], steps[0].item()))
    view = steps[1].view(1)
    seen.append((view.untyped_storage()._cdata == steps[1].untyped_storage()._cdata,
                 view.constant is not None and view.item() == 1.0))
    steps[1].add_(torch.ops.aten.add.Tensor(x, 1.0))
    seen.append((steps[1].constant is None, view.constant is None, steps[2].item()))
    n = torch.tensor(7, dtype=torch.int64)
    seen.append((n.item(), n.dtype, (n * 2).item()))
    memo = fm.fake_tensor_converter._get_memo     # the converter knows each lifted counter
    seen.append([memo(s.constant) is s for s in steps[::2]] + [memo(n.constant) is n])
    return seen


def test_lifted_scalars_are_answered_like_fake_tensor_mode():
    reference_mode = FakeTensorMode()
    with reference_mode:
        expected = _lifted_constants(reference_mode)
    fm = FakeTensorMode()
    recorder, cache = _recording(fm)
    with fm, recorder:
        first = _lifted_constants(fm)           # each lift's metadata seen once: FakeTensorMode
        hits = cache.hits
        second = _lifted_constants(fm)          # now made by the cache
        before = cache.hits
        torch.tensor(5.0)
        lifted = cache.hits - before
    assert first == second == expected
    assert cache.hits >= hits + 4 and lifted == 1   # a lift of known metadata: answered here
    assert expected[0] == [1.0, 1.0, 1.0] and expected[3] == (True, True, 1.0)
    assert expected[5] == [True, True, True]


def test_lifts_that_are_not_constants_go_to_fake_tensor_mode():
    fm = FakeTensorMode()
    recorder, cache = _recording(fm)
    with fm, recorder:
        for _ in range(2):
            big = torch.tensor([1.0, 2.0, 3.0])   # more than one element: no constant
            assert isinstance(big, FakeTensor) and big.constant is None
            assert big.shape == (3,)
    assert cache.hits == 0
