"""Per-step work of a tracked loop (issue 16): the snapshots at every optimizer step read
storage addresses without is_fake's Python walk, and track(health=True) takes the norm the
optimizer sees from an L2 clip that just scaled the same, unchanged gradients instead of a
second pass over them - while every change between clip and step is still seen."""

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


def test_fake_optimizer_state_is_noted_without_reading_addresses():
    import warnings
    from torch._subclasses.fake_tensor import FakeTensorMode
    from memprof.record.events import CAT_OPTIMIZER_STATE
    with FakeTensorMode():
        state = [torch.zeros(3), torch.zeros(3)]
    from types import SimpleNamespace
    rec = snapshots.SnapshotRecorder(SimpleNamespace(scope=SimpleNamespace(param_module={})))
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # FakeTensor.data_ptr() warns
        memprof._C.start(1000)
        try:
            for _ in range(2):
                rec._take_if_changed(CAT_OPTIMIZER_STATE, object, [(t, t) for t in state])
        finally:
            memprof._C.stop()
            memprof._C.take_events([])
    assert len(rec.snapshots) == 2   # fake: no address to compare, so noted each time
