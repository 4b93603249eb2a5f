"""A long run keeps little in Python per step beside its native event log, and no per-step
snapshot once the log is full (past `track(capacity=...)`): a job that trains for days under
`memprof run` did grow by a list of ints per parameter per step until it ended."""
import array
import gc
import tracemalloc
import warnings

import pytest
import torch

import memprof
from memprof import _C, profile_file
from memprof.record.events import CAT_GRADIENTS
from memprof.record.snapshots import Snapshot


def _model(layers: int = 6):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(layers)])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _train(model, opt, steps: int) -> list[float]:
    losses = []
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _gradient_snapshots(tracker) -> list:
    return [Snapshot(-1, *noted) for noted in tracker.session.snapshots.taken
            if noted[0] == CAT_GRADIENTS]


def test_gradient_snapshots_are_int64_arrays_sharing_one_owner_array(tmp_path):
    model, opt = _model()
    with memprof.track(model, opt) as prof:
        _train(model, opt, 6)
        grads = _gradient_snapshots(prof)
        assert len(grads) >= 5   # set_to_none: new gradient storages at every step
        assert all(isinstance(s.ptrs, array.array) and s.ptrs.typecode == "q" for s in grads)
        assert all(len(s.ptrs) == 12 and len(s.modules) == 12 for s in grads)
        # the owners do not change from step to step: one array for all of them
        assert all(s.modules is grads[0].modules for s in grads)
        assert len(set(grads[0].modules)) == 6   # each layer owns its weight and bias
    summary = prof.profile.summary()
    assert summary["by_category_at_peak"]["gradients"] > 0
    # written as JSON lists, read back the same addresses and owners
    path = str(tmp_path / "run.memprof")
    prof.profile.save(path)
    run, _ = profile_file.read(path)
    assert [(s.marker, s.category, list(s.ptrs), list(s.modules or [])) for s in run.snapshots] \
        == [(s.marker, s.category, list(s.ptrs), list(s.modules or []))
            for s in prof.profile.snapshots]
    assert memprof.load(path).summary()["by_category_at_peak"] == \
        summary["by_category_at_peak"]


def test_past_its_capacity_a_run_takes_no_snapshot_and_grows_little():
    model, opt = _model(layers=40)   # 80 parameters: a list of ints for each, each step
    assert not _C.log_full()          # not recording
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the dropped-events warning
        with memprof.track(model, opt, health=False, capacity=3000) as prof:
            _train(model, opt, 3)
            assert _C.log_full()
            taken = len(prof.session.snapshots.taken)
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            _train(model, opt, 200)
            gc.collect()
            grown = (tracemalloc.get_traced_memory()[0] - before) / 200
            tracemalloc.stop()
            assert len(prof.session.snapshots.taken) == taken
    # a gradient snapshot of 80 storages per step was ~4 KB/step; what is left per step (the
    # backward call's roots and step, the step end's owner and sequence number) ~200 bytes
    assert grown < 600, grown
    summary = prof.profile.summary()
    assert summary["dropped_events"] > 0 and summary["truncated"]
    assert summary["by_category_at_peak"]["parameters"] == \
        sum(p.numel() * p.element_size() for p in model.parameters())


def test_a_log_that_is_not_full_is_said_so():
    model, opt = _model()
    with memprof.track(model, opt, capacity=10**6):
        _train(model, opt, 2)
        assert not _C.log_full()
    assert not _C.log_full()


def test_tracking_past_capacity_leaves_training_as_it_was():
    model, opt = _model()
    plain = _train(model, opt, 20)
    model, opt = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with memprof.track(model, opt, capacity=500):
            tracked = _train(model, opt, 20)
    assert tracked == plain


def test_the_step_in_which_the_log_fills_keeps_its_gradients_named():
    """Capacities that end the log anywhere in a step: the gradients it kept are named as in
    the whole run (the step's snapshot, at its optimizer step, is taken although the log
    filled before it: its gradients were allocated in that step). Python's collector is off:
    where it ran (what a run before left) moved frees between runs of the same loop."""
    import numpy as np
    from memprof.record.events import CAT_GRADIENTS

    def named_gradients(capacity=None):
        model, opt = _model()
        gc.collect()
        with memprof.track(model, opt, **({"capacity": capacity} if capacity else {})) as t:
            _train(model, opt, 4)
        return t.profile, t.profile.category == CAT_GRADIENTS

    gc.disable()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            whole, reference = named_gradients()
            base = named_gradients(capacity=1)[1].size - 1   # rows of the blocks from before
            step = whole.steps[2]   # positions in the memory stream, the baseline's rows first
            for end in range(step.start + 1, step.end + 1, max(1, (step.end - step.start) // 24)):
                named = named_gradients(capacity=end - base)[1]
                assert named.size == end
                assert np.array_equal(named, reference[:end]), end
    finally:
        gc.enable()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_block_allocated_past_the_log_is_not_named_by_its_address(device):
    """The log fills with a block `a` alive; `a` is freed and a gradient takes its address, both
    past the log's end. The log pairs a's allocation with no free, so matching the optimizer
    step's snapshot by address named `a` a gradient (an activation read "gradients" wherever
    the allocator reused its address after the log filled). The blocks are 42 MB: the C
    allocator maps each anew (above glibc's largest mmap threshold), and Linux hands the
    address just unmapped straight back (small blocks' reuse depends on the heap's history);
    CUDA's caching allocator hands a freed block to the next request of its size."""
    model = torch.nn.Linear(4096, 2560, bias=False, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    checked = 0
    gc.collect()
    gc.disable()   # a collection's frees in the loop would shift which event fills the log
    try:
        for capacity in range(400, 404):   # the log's last event is a's allocation in some
            checked += _named_past_the_log(model, opt, capacity)
            if checked:
                break
    finally:
        gc.enable()
    assert checked == 1


def _named_past_the_log(model, opt, capacity: int) -> int:
    """The case above with one capacity: 1 if a's allocation was the log's last event (the
    case checked), 0 if a free was (a's allocation dropped: nothing to confuse)."""
    import numpy as np

    model.weight.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the dropped-events warning
        with memprof.track(model, opt, capacity=capacity) as t:
            a = None
            while not _C.log_full():
                a = None   # each `a` takes the block of the one before
                a = torch.empty_like(model.weight)
            address = a.data_ptr()
            del a
            model.weight.grad = torch.ones_like(model.weight)   # past the log: not in it
            assert model.weight.grad.data_ptr() == address   # a's block, handed back
            opt.step()
    mem = t.profile.memory
    rows = np.nonzero(mem["ptr"] == address)[0]
    if mem["size"][rows[-1]] < 0:
        return 0
    assert not (t.profile.category[rows] == CAT_GRADIENTS).any()
    assert t.profile.summary()["by_category_at_peak"].get("gradients", 0) == 0
    return 1


def test_a_gradient_made_past_one_blocks_log_is_freed_in_the_next_block():
    """A block whose allocation one block's full log dropped carries a mark of it (its own
    deleter); kept into the next block (in that block's baseline: gradients kept across
    blocks), it is named there and its free is reported as any baseline block's."""
    model, opt = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with memprof.track(model, opt, capacity=50):
            x = torch.randn(2, 8)
            while not _C.log_full():
                x = x + 1
            model(x).square().mean().backward()   # the gradients: past the log
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    with memprof.track(model, opt) as t:
        opt.step()
        opt.zero_grad(set_to_none=True)   # frees the baseline's gradients
    assert t.profile.breakdown("category", at=0)["gradients"] == grads
    assert t.profile.breakdown("category", at="end").get("gradients", 0) == 0
