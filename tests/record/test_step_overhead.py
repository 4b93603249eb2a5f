"""Per-step work of a tracked loop (issue 16): the snapshots at every optimizer step read
storage addresses without is_fake's Python walk, and track(health=True) takes the norm the
optimizer sees from an L2 clip that just scaled the same, unchanged gradients instead of a
second pass over them - while every change between clip and step is still seen."""

import contextlib
from array import array

import pytest
import torch

import memprof
from memprof.record import snapshots
from tiny_mlp import MLP

D, H, C = 32, 256, 4


pytestmark = pytest.mark.usefixtures("collect_garbage_after")


def _setup(seed=0):
    torch.manual_seed(seed)
    model = MLP(D, H, C)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(64, D, generator=g), torch.randn(64, C, generator=g)


def _norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack(
        [p.grad.norm() for p in params if p.grad is not None])))


def _clipped_loop(between=None, steps=6, max_norm=0.05, count_norms=None):
    """forward, backward (loss x 1024), clip, `between(params)`, optimizer step; returns the
    profile and the norm of the gradients each optimizer step really used."""
    model, opt = _setup()
    seen = []
    with memprof.track(model, opt, health=True) as prof:
        for i in range(steps):
            x, y = _batch(i)
            (torch.nn.functional.mse_loss(model(x), y) * 1024).backward()
            torch.nn.utils.clip_grad_norm_((p for p in model.parameters()), max_norm)
            if between is not None:
                between(list(model.parameters()))
            seen.append(_norm(model.parameters()))
            if count_norms is not None:
                count_norms.clear()
            opt.step()
            if count_norms is not None:
                assert count_norms == [], "the optimizer's norm was computed again"
            opt.zero_grad()
    return prof, seen


def test_norm_after_a_clip_is_not_computed_again(monkeypatch):
    calls = []
    original = torch._foreach_norm

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(torch, "_foreach_norm", counting)
    prof, seen = _clipped_loop(count_norms=calls)
    h = prof.health
    assert h["per_step"]["clipped"] == [True] * 6
    assert h["per_step"]["grad_norm"] == pytest.approx(seen, rel=1e-5)
    assert "grad_clip_mismatch" not in [f.kind for f in prof.findings]


def _unscale(params):
    """GradScaler's unscale_ kernel: rewrites the gradients without a version bump."""
    grads = [p.grad for p in params]
    torch._amp_foreach_non_finite_check_and_unscale_(grads, torch.zeros(1),
                                                     torch.full((1,), 1 / 1024))


def _through_data(params):
    for p in params:
        p.grad.data.mul_(1 / 1024)   # .data: no version bump either


def _in_place(params):
    for p in params:
        p.grad /= 1024


@pytest.mark.parametrize("between", [_unscale, _through_data, _in_place])
def test_a_change_between_clip_and_step_is_still_seen(between):
    prof, seen = _clipped_loop(between=between)
    h = prof.health
    assert h["per_step"]["grad_norm"] == pytest.approx(seen, rel=1e-5)
    assert h["per_step"]["grad_norm"] == pytest.approx([0.05 / 1024] * 6, rel=1e-3)
    assert "grad_clip_mismatch" in [f.kind for f in prof.findings]


def test_clip_on_a_generator_still_clips_every_parameter():
    prof, seen = _clipped_loop(max_norm=0.05)
    assert seen == pytest.approx([0.05] * 6, rel=1e-4)
    assert prof.health["per_step"]["grad_norm_pre_clip"][0] > 0.05


def test_step_snapshots_skip_is_fake_for_plain_tensors(monkeypatch):
    calls = []
    real = snapshots.is_fake

    def counting(t):
        calls.append(type(t))
        return real(t)
    model, opt = _setup()
    with memprof.track(model, opt) as prof:
        monkeypatch.setattr(snapshots, "is_fake", counting)
        for i in range(3):
            x, y = _batch(i)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        monkeypatch.setattr(snapshots, "is_fake", real)
    assert calls == []
    # the categories are still found: every gradient and state block is named
    assert prof.breakdown()["gradients"] > 0 and prof.breakdown()["optimizer_state"] > 0


def test_storage_key_fast_path_matches_the_general_one():
    t = torch.randn(5, 3)[1:]
    p = torch.nn.Parameter(torch.randn(4))
    for x in (t, p, torch.randn(0)):
        assert snapshots.is_plain_tensor(x)
    assert snapshots.storage_key(t) == (t.untyped_storage().data_ptr(),
                                        t.untyped_storage().nbytes(), snapshots.DEVICE_CPU)
    assert snapshots.storage_ptr(t) == snapshots.storage_key(t)[0]
    assert snapshots.storage_ptr(torch.empty(3, device="meta")) is None
    assert snapshots.storage_ptr(torch.randn(3).to_sparse()) is None
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fake = torch.randn(3)
    assert not snapshots.is_plain_tensor(fake)
    assert snapshots.storage_key(fake)[2] == snapshots.FAKE_DEVICE_TYPE


class _ReallocatingOptimizer(torch.optim.Optimizer):
    """Momentum SGD that builds a new state tensor at every step (no in-place update)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.01})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    st = self.state[p]
                    st["avg"] = st.get("avg", torch.zeros_like(p)) * 0.9 + p.grad
                    p.add_(st["avg"], alpha=-group["lr"])


def _state_snapshots(make_optimizer, steps=5):
    torch.manual_seed(0)
    model = MLP(D, H, C)
    opt = make_optimizer(model.parameters())
    with memprof.track(model, opt) as prof:
        for i in range(steps):
            x, y = _batch(i)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
    return prof, [s.category for s in prof.run.snapshots]


def test_state_updated_in_place_is_noted_once_and_new_state_every_step():
    from memprof.record.events import CAT_GRADIENTS, CAT_OPTIMIZER_STATE
    prof, cats = _state_snapshots(lambda p: torch.optim.AdamW(p, lr=1e-3))
    # after the first step: the same state tensors and (zeroed in place) the same gradients
    assert cats.count(CAT_OPTIMIZER_STATE) <= 3 and cats.count(CAT_GRADIENTS) <= 3
    assert prof.breakdown()["optimizer_state"] == 2 * 4 * sum(
        p.numel() for p in MLP(D, H, C).parameters()) + 4 * len(list(MLP(D, H, C).parameters()))
    prof, cats = _state_snapshots(_ReallocatingOptimizer)
    assert cats.count(CAT_OPTIMIZER_STATE) >= 5      # a new tensor each step: noted each step
    per_step = 4 * sum(p.numel() for p in MLP(D, H, C).parameters())
    assert prof.breakdown()["optimizer_state"] == per_step


def test_state_unchanged_for_many_steps_is_looked_at_ever_less_often(monkeypatch):
    """Like the buffers (tests/record/test_buffers.py): a look at AdamW's state cost ~20 us
    at the end of a big step; a state tensor replaced between looks is noted at the next."""
    from memprof.record.events import CAT_OPTIMIZER_STATE
    from memprof.record.snapshots import SnapshotRecorder
    looks, note_state = [], SnapshotRecorder.note_state

    def counted(self, optimizer):
        looks.append(self.session.steps.step)
        return note_state(self, optimizer)
    monkeypatch.setattr(SnapshotRecorder, "note_state", counted)
    torch.manual_seed(0)
    model = MLP(D, H, C)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = next(model.parameters())
    with memprof.track(model, opt) as prof:
        for i in range(40):
            if i == 20:   # a state tensor replaced (a resumed run's, a hand-made change)
                opt.state[first]["exp_avg"] = opt.state[first]["exp_avg"].clone()
            x, y = _batch(i % 5)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    # (the optimizer's post-hook runs before its step is counted: the state made at step 0,
    # the same at 1, 3, 7, 15; 31 finds the replaced tensor: every step again)
    assert looks == [0, 1, 3, 7, 15, 31, 32, 34, 38], looks
    replaced = opt.state[first]["exp_avg"].untyped_storage().data_ptr()
    alive = prof.alive_at("end")
    at = alive[prof.memory["ptr"][alive] == replaced]
    assert len(at) == 1 and prof.category[at[0]] == CAT_OPTIMIZER_STATE


def test_fake_optimizer_state_is_noted_without_reading_addresses():
    import warnings
    from types import SimpleNamespace
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        state = [torch.zeros(3), torch.zeros(3)]
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in state]
    opt = SimpleNamespace(state={p: {"avg": t} for p, t in zip(params, state)})
    rec = snapshots.SnapshotRecorder(SimpleNamespace(scope=SimpleNamespace(param_module={})))
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # FakeTensor.data_ptr() warns
        memprof._C.start(1000)
        try:
            for _ in range(2):
                rec.note_state(opt)
        finally:
            memprof._C.stop()
            memprof._C.take_events([])
    assert len(rec.taken) == 2   # fake: no address to compare, so noted each time


def test_storage_addresses_read_in_one_native_call_match_storage_ptr():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fake = torch.zeros(3)
    plain = [torch.randn(5, 3)[1:], torch.nn.Parameter(torch.randn(4)), torch.randn(0),
             torch.empty(3, device="meta"), torch.randn(3).to_sparse()]
    addresses = memprof._C.plain_storage_addresses(plain + [fake])
    assert addresses[:2] == [t.untyped_storage().data_ptr() for t in plain[:2]]
    assert addresses[2:5] == [0, 0, 0]       # no data, meta, sparse: no address
    assert addresses[5] == -1                # not a plain tensor: Python's path
    assert snapshots.storage_ptrs(plain + [fake]) == [snapshots.storage_ptr(t)
                                                      for t in plain + [fake]]


def test_storage_note_names_the_same_allocations_only():
    a, b = torch.zeros(4), torch.zeros(4)
    note = memprof._C.StorageNote()
    assert note.note([a, b]) and note.same([a, b])
    a.add_(1)                                 # in place: the same allocation
    assert note.same([a, b]) and not note.same([b, a]) and not note.same([a])
    view = a[1:]                              # another tensor of the same storage
    assert note.same([view, b])
    a.data = torch.zeros(4)                   # the same tensor object, a new allocation
    assert not note.same([a, b])
    assert note.note([a, b])
    c = b.clone()
    del b
    b = torch.zeros(4)                        # a new storage (perhaps at the old address)
    assert not note.same([a, b]) and not note.same([a, c])
    empty = torch.empty(0)                    # a storage without data: its identity counts
    note = memprof._C.StorageNote()
    assert note.note([a, empty]) and note.same([a, empty])
    assert not note.same([a, torch.empty(0)])
    assert not memprof._C.StorageNote().note([a, torch.randn(3).to_sparse()])  # no storage
    assert not memprof._C.StorageNote().same([])                     # never noted
    assert not note.same_state(list(range(3)))   # not a dict: never the same


def test_storage_note_walks_an_optimizer_state_in_state_pairs_order():
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    state = {params[0]: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2), "lr": 0.1},
             params[1]: {"history": [torch.zeros(2), 3, torch.zeros(2)]},
             params[2]: {"momentum": torch.zeros(2)}}
    opt = type("Opt", (), {"state": state})()
    note = memprof._C.StorageNote()
    assert note.note([t for t, _ in snapshots.state_pairs(opt)])
    assert note.same_state(state)
    state[params[0]]["step"] += 1             # in place
    assert note.same_state(state)
    state[params[1]]["history"].append(torch.zeros(2))   # one more tensor
    assert not note.same_state(state)
    state[params[1]]["history"].pop()
    assert note.same_state(state)
    state[params[2]]["momentum"] = torch.zeros(2)          # replaced
    assert not note.same_state(state)
    del state[params[2]]                                   # one fewer
    assert not note.same_state(state)


def test_snapshots_of_a_deep_model_per_step_are_cheap():
    """A 122-parameter model: checking that AdamW's 366 state tensors are the ones noted
    last step takes microseconds (it took ~0.3 ms in Python)."""
    import time
    from types import SimpleNamespace
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(61)])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    rec = snapshots.SnapshotRecorder(SimpleNamespace(scope=SimpleNamespace(param_module={})))
    memprof._C.start(1000)
    try:
        rec.note_state(opt)
        per_check = float("inf")
        for _ in range(5):       # the best of 5 blocks: a busy machine's pauses left out
            t = time.perf_counter()
            for _ in range(100):
                rec.note_state(opt)
            per_check = min(per_check, (time.perf_counter() - t) / 100)
    finally:
        memprof._C.stop()
        memprof._C.take_events([])
    assert len(rec.taken) == 1            # noted once, then found unchanged
    assert per_check < 100e-6, per_check


def _python_gradient_snapshot(opt, param_module):
    """What the Python path of SnapshotRecorder takes for the gradients (its _take)."""
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    owner = {}
    for ptr, p in zip(snapshots.storage_ptrs([p.grad for p in params]), params):
        if ptr is not None:
            owner.setdefault(ptr, param_module.get(id(p), -1))
    return list(owner), list(owner.values())   # parameter order, each address once


def _take(note, param_groups, param_module):
    """note.take(...), its native int64 bytes read as lists of ints."""
    taken = note.take(param_groups, param_module)
    if isinstance(taken, tuple):
        return tuple(array("q", part).tolist() for part in taken)
    return taken


@contextlib.contextmanager
def _recording():
    """A native recording session without a tracker around it: a gradient note compares
    storages only while one records (the allocations it is told of)."""
    memprof._C.start(1 << 16)
    try:
        yield
    finally:
        memprof._C.stop()


def test_gradient_note_takes_what_the_python_path_takes_and_skips_the_same_storages():
    with _recording():
        _gradient_note_takes_and_skips()


def _gradient_note_takes_and_skips():
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), torch.nn.Linear(4, 4), shared)
    frozen = torch.nn.Linear(4, 4)            # in the optimizer, never given a gradient
    opt = torch.optim.SGD([{"params": model.parameters()},
                           {"params": frozen.parameters(), "lr": 0.0}], lr=0.1)
    param_module = {id(p): i for i, p in enumerate(model.parameters())}   # frozen: absent
    note = memprof._C.GradientNote()
    assert _take(note, opt.param_groups, param_module) == ([], [])   # no gradient yet
    assert _take(note, opt.param_groups, param_module) is None
    model(torch.randn(2, 4)).sum().backward()
    model[2].weight.grad = model[0].weight.grad.view(4, 4)   # one storage, two owners
    taken = _take(note, opt.param_groups, param_module)
    assert taken == _python_gradient_snapshot(opt, param_module)
    assert taken[1][taken[0].index(model[0].weight.grad.data_ptr())] == 0   # the first owner
    assert _take(note, opt.param_groups, param_module) is None
    opt.zero_grad(set_to_none=False)          # zeroed in place: the same storages
    model(torch.randn(2, 4)).sum().backward()
    assert _take(note, opt.param_groups, param_module) is None
    param_module[id(frozen.weight)] = 9       # a module named since: taken anew
    assert _take(note, opt.param_groups, param_module) == taken
    opt.zero_grad(set_to_none=True)           # new gradients: new storages
    model(torch.randn(2, 4)).sum().backward()
    again = _take(note, opt.param_groups, param_module)
    assert again == _python_gradient_snapshot(opt, param_module) and len(again[0]) == 4


def test_gradient_note_sees_new_gradients_in_the_old_storages_place():
    """zero_grad(set_to_none=True) frees each gradient, and the allocator often hands the next
    one the same block and the same storage object's memory: the note holds no reference to
    the old storages (that slowed the step, see csrc/address_watch.h), so it tells them apart
    by the allocation it was told of - each new gradient is taken, never skipped as the same."""
    reused = 0
    for size in (1024, 4096, 1 << 16, 1 << 18, 1 << 20):   # reuse depends on the heap's state
        param = torch.nn.Parameter(torch.zeros(size))
        param.grad = torch.ones(size)
        groups = [{"params": [param]}]
        note = memprof._C.GradientNote()
        with _recording():
            assert _take(note, groups, {}) == ([param.grad.data_ptr()], [-1])
            for _ in range(100 if reused < 3 else 2):
                assert _take(note, groups, {}) is None            # nothing happened: the same
                old = (param.grad.untyped_storage()._cdata, param.grad.data_ptr())
                param.grad = None
                param.grad = torch.ones(size)
                reused += (param.grad.untyped_storage()._cdata, param.grad.data_ptr()) == old
                assert _take(note, groups, {}) == ([param.grad.data_ptr()], [-1])
    # outside a recording session no allocation is seen: never "the same"
    assert _take(note, groups, {}) == ([param.grad.data_ptr()], [-1])
    assert _take(note, groups, {}) == ([param.grad.data_ptr()], [-1])
    note.forget()
    if reused == 0:   # (glibc hands the block back in most processes, not in every heap state)
        pytest.skip("the allocator never gave a new gradient the old one's block and storage "
                    "object here: the case that needs the allocation watch did not occur")


def test_gradient_note_of_thousands_of_gradients_still_skips_the_same_storages():
    """A mixture of experts has tens of thousands of parameters: the note's watch of their
    addresses grows with them, so unchanged gradients are still not taken again at every step
    (a snapshot of every address per step would grow the run's memory step after step)."""
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(6000)]
    for p in params:
        p.grad = torch.ones(2)
    groups = [{"params": params}]
    note = memprof._C.GradientNote()
    with _recording():
        taken = _take(note, groups, {})
        assert len(taken[0]) == 6000
        assert _take(note, groups, {}) is None
        params[4321].grad = torch.ones(2)          # one new gradient
        again = _take(note, groups, {})
        assert again is not None and params[4321].grad.data_ptr() in again[0]
        assert _take(note, groups, {}) is None
    note.forget()


def test_gradient_notes_share_a_few_address_watches_and_give_them_back():
    """Each note watches its addresses in one of 8 watches (every allocation looks each watch
    in use up): a ninth note at once falls back to taking its gradients at every step, and
    takes a watch as soon as one is given back."""
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.ones(4)
    groups = [{"params": [param]}]
    notes = []
    with _recording():
        for _ in range(9):   # (a note another test left alive may hold a watch)
            notes.append(memprof._C.GradientNote())
            assert _take(notes[-1], groups, {}) is not None
            if _take(notes[-1], groups, {}) is not None:     # no watch: taken again
                break
        unwatched = notes[-1]
        assert len(notes) <= 9 and all(_take(n, groups, {}) is None for n in notes[:-1])
        assert _take(unwatched, groups, {}) is not None      # still none free
        notes[0].forget()                                   # one given back
        assert _take(unwatched, groups, {}) is not None      # noted, now watched
        assert _take(unwatched, groups, {}) is None
    for note in notes:
        note.forget()


def test_an_optimizer_collected_inside_the_block_gives_its_note_back():
    import gc
    model, _ = _setup()
    with memprof.track(model) as prof:
        notes = prof.session.snapshots._gradient_notes
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = _batch(0)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        key = id(opt)
        assert key in notes
        del opt
        gc.collect()
        assert key not in notes


def test_gradient_note_hands_other_tensors_to_python_and_lets_go_of_the_parameters():
    import gc
    import weakref
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fake = torch.nn.Parameter(torch.zeros(3))
    fake.grad = torch.zeros_like(fake)
    note = memprof._C.GradientNote()
    assert _take(note, [{"params": [fake]}], {}) is False
    plain = torch.nn.Parameter(torch.zeros(3))
    with FakeTensorMode():
        plain.grad = torch.zeros(3)           # a fake gradient on a plain parameter
    assert _take(note, [{"params": [plain]}], {}) is False
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.ones(3)
    alive = weakref.ref(param)
    assert _take(note, [{"params": [param]}], {}) == ([param.grad.data_ptr()], [-1])
    del param
    gc.collect()
    assert alive() is not None                # held by the note while the session runs
    note.forget()
    gc.collect()
    assert alive() is None


def test_a_run_with_new_gradients_each_step_names_each_steps_gradients(monkeypatch):
    """zero_grad(set_to_none=True): every step's gradients are new storages, each named
    through the native note (the Python path never runs for them); the gradients alive at
    the end are the last step's."""
    from memprof.record.events import CAT_GRADIENTS
    python_path = []
    real = snapshots.SnapshotRecorder._take_noted
    monkeypatch.setattr(snapshots.SnapshotRecorder, "_take_noted",
                        lambda self, cat, *a: (python_path.append(cat), real(self, cat, *a)))
    model, opt = _setup()
    with memprof.track(model, opt) as prof:
        for i in range(3):
            x, y = _batch(i)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
    assert CAT_GRADIENTS not in python_path
    grads = [s for s in prof.run.snapshots if s.category == CAT_GRADIENTS]
    assert len(grads) >= 3
    n_params = len(list(model.parameters()))
    assert all(len(s.ptrs) == n_params for s in grads)
    assert prof.breakdown(at="end")["gradients"] == sum(
        p.grad.untyped_storage().nbytes() for p in model.parameters())


def test_buffer_addresses_read_natively_match_the_python_path():
    from types import SimpleNamespace
    from torch._subclasses.fake_tensor import FakeTensorMode
    shared = torch.zeros(3)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4),
                                torch.nn.BatchNorm1d(4, track_running_stats=False))
    model[1].register_buffer("table", shared)
    model[1].register_buffer("unset", None)
    model[0].register_buffer("same_table", shared)       # one storage, two buffers
    model[1].register_buffer("empty", torch.empty(0))    # no data: no address
    scope = SimpleNamespace(module_ids=lambda: [(m, i) for i, m in enumerate(model.modules())])
    rec = snapshots.SnapshotRecorder(SimpleNamespace(scope=scope))
    native = memprof._C.module_buffer_addresses(scope.module_ids())
    assert native == snapshots._sorted_storage_ptrs(rec.buffers())
    assert native.count(shared.data_ptr()) == 2 and len(native) == 5   # BN: 3; the table x2
    with FakeTensorMode():
        fake = torch.zeros(2)
    model[2].register_buffer("fake", fake)
    assert memprof._C.module_buffer_addresses(scope.module_ids()) is None   # Python decides
    assert memprof._C.module_buffer_addresses([(object(), 0)]) is None      # no _buffers


def test_gradient_note_leaves_param_groups_of_another_shape_to_python():
    """An optimizer wrapper may keep its groups in a tuple or as mappings of its own: the
    native note declines (the Python path reads them), it never raises into the step."""
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    note = memprof._C.GradientNote()
    assert _take(note, ({"params": [p]},), {}) is False
    assert _take(note, [{"params": (p,)}], {}) is False
    assert _take(note, [[p]], {}) is False
    assert _take(note, [{"params": [p]}], {}) == ([p.grad.data_ptr()], [-1])


def test_per_step_subscribers_leave_once_they_have_nothing_to_do():
    """The first forward's inputs are described once; the search for hand-written updates
    stops with the first optimizer step (steps are explicit from then on) - and the profile
    still has every step, batch and phase marker."""
    model, opt = _setup()
    with memprof.track(model, opt) as prof:
        session = prof.session
        after_backward = len(session.backward.after)
        forward_start = len(session.scope.on_forward_start)
        for i in range(3):
            x, y = _batch(i)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert len(session.scope.on_forward_start) == forward_start - 1   # the inputs' hook
        assert len(session.backward.after) == after_backward - 1          # auto steps'
        assert session.scope.before_forward == []
    assert prof.profile.run.meta["steps_marked"] == 3
    assert prof.profile.run.records["inputs"]["args"] == [
        {"tensor": {"shape": [64, D], "dtype": "float32", "device": "cpu"}}]
    for label in ("forward_start", "forward_end", "backward_start", "backward_end",
                  "optimizer_start", "step"):
        assert len(prof.markers(label)) == 3, label
    assert [m["value"] for m in prof.markers("step")] == [0, 1, 2]
    assert [m["value"] for m in prof.markers("batch")] == [64, 64, 64]


def test_a_hand_written_update_is_still_found_at_each_next_forward():
    """Without an optimizer the check for a changed parameter runs between a backward and the
    next forward only, and each update still ends a step."""
    model, _ = _setup()
    with memprof.track(model) as prof:
        session = prof.session
        for i in range(3):
            x, y = _batch(i)
            torch.nn.functional.mse_loss(model(x), y).backward()
            assert session.scope.before_forward == [session.auto_steps.check]
            # accumulation: a second micro-batch before the update, the check stays one
            torch.nn.functional.mse_loss(model(x), y).backward()
            assert session.scope.before_forward == [session.auto_steps.check]
            with torch.no_grad():
                for p in model.parameters():
                    p -= 1e-3 * p.grad
                    p.grad = None
            model(x)   # the next forward: the change is found, the check leaves
            assert session.scope.before_forward == []
    assert prof.profile.run.meta["steps_marked"] == 3
