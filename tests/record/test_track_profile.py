"""memprof.track on real training steps: exact attribution, invariants, safety, persistence."""
import copy
import os
import threading
import warnings

import numpy as np
import pytest
import torch

import memprof
from memprof import _C
from memprof.profile_file import ProfileFormatError

B, D, H, C = 32, 64, 128, 10
F32 = 4


def param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_forward_activations_and_peak_are_exact(mlp):
    x = torch.randn(B, D)
    with memprof.track(mlp) as prof:
        out = mlp(x)
    P = param_bytes(mlp)
    # fc1 output (freed after ReLU: ReLU saves its result), ReLU output and logits kept.
    assert prof.peak == P + 2 * B * H * F32
    cats = prof.breakdown("category", at="end")
    assert cats["parameters"] == P
    assert cats["activations"] == B * H * F32 + B * C * F32
    assert cats["temporaries"] == 0
    pe = prof.peak_event
    assert pe["phase"] == "forward" and pe["module"] == "act" and pe["op"] == "aten::relu"
    assert out.shape == (B, C)


def test_training_step_categories_are_exact(mlp):
    opt = torch.optim.Adam(mlp.parameters())
    x, y = torch.randn(B, D), torch.randint(0, C, (B,))
    with memprof.track(mlp, opt) as prof:
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(mlp(x), y)
            loss.backward()
            opt.step()
        # grads still alive here (no zero_grad yet)
    P = param_bytes(mlp)
    n_params = len(list(mlp.parameters()))
    cats = prof.breakdown("category", at="end")
    assert cats["parameters"] == P
    assert cats["gradients"] == P
    assert cats["optimizer_state"] == 2 * P + n_params * F32  # exp_avg, exp_avg_sq, step
    assert len(prof.steps) == 2
    # modules plus "outside" add up to the total, at the peak and at the end
    for at in ("peak", "end", 0):
        total = int(prof.live_bytes()[prof._resolve_at(at)])
        assert sum(prof.breakdown("module", at=at).values()) == total
        assert sum(prof.breakdown("category", at=at).values()) == total
    # gradients and optimizer state belong to their parameter's module
    mods = prof.breakdown("module", at="end")
    fc1 = sum(p.numel() * 4 for p in mlp.fc1.parameters())
    assert mods["fc1"] == fc1 * 4 + 2 * F32  # param + grad + 2 moments + 2 step scalars
    assert "AddmmBackward0" in prof.saved_by_node or "ReluBackward0" in prof.saved_by_node


def test_live_bytes_track_the_allocator_total(mlp):
    import gc
    gc.collect()  # blocks of earlier tests freed inside the block would shift the allocator total
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    x = torch.randn(B, D)
    with memprof.track(mlp, opt) as prof:
        for _ in range(3):
            mlp(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    mem = prof.memory
    real = mem["thread"] >= 0
    # The allocator's running total and ours differ by a constant: blocks alive before tracking.
    diff = prof.live_bytes()[real] - mem["total_allocated"][real]
    assert np.all(diff == diff[0])
    assert prof.untracked_frees == 0


def _step(model, x, y):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def test_same_allocation_total_as_torch_profiler(mlp):
    x, y = torch.randn(B, D), torch.randint(0, C, (B,))
    _step(mlp, x, y)  # warm up lazily created state
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as tp:
        _step(mlp, x, y)
    from torch._C._profiler import _EventType

    def walk(evs):
        for e in evs:
            yield e
            yield from walk(e.children)
    tree = tp.profiler.kineto_results.experimental_event_tree()
    torch_total = sum(e.extra_fields.alloc_size for e in walk(tree)
                      if e.tag == _EventType.Allocation and e.extra_fields.alloc_size > 0)
    with memprof.track(mlp) as prof:
        _step(mlp, x, y)
    mem = prof.memory
    ours = int(mem["size"][(mem["size"] > 0) & (mem["thread"] >= 0)].sum())
    assert ours == torch_total > 0


def test_tracking_does_not_change_results():
    torch.manual_seed(1)
    base = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.GELU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(H, C))
    data = [(torch.randn(B, D), torch.randint(0, C, (B,))) for _ in range(3)]

    def train(tracked):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(7)
        losses = []
        ctx = memprof.track(model, opt) if tracked else _null()
        with ctx:
            for x, y in data:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                grads = [p.grad.clone() for p in model.parameters()]
                opt.step()
                opt.zero_grad()
                losses.append(loss.detach())
        return losses, grads, [p.detach().clone() for p in model.parameters()]

    a, b = train(False), train(True)
    for xs, ys in zip(a, b):
        for u, v in zip(xs, ys):
            assert torch.equal(u, v)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _no_hooks_left(model):
    from torch.optim import optimizer as optmod
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
        assert "forward" not in vars(m)   # nothing of memprof's set on the instance
    assert not optmod._global_optimizer_pre_hooks and not optmod._global_optimizer_post_hooks
    assert not _C.is_active()
    assert threading.getprofile() is None


def test_hooks_removed_on_exit_and_on_exception(mlp, tmp_path):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    with memprof.track(mlp, opt):
        mlp(torch.randn(2, D)).sum().backward()
        opt.step()
    _no_hooks_left(mlp)
    path = tmp_path / "crash.memprof"
    with pytest.raises(ValueError, match="boom"):
        with memprof.track(mlp, opt, path=str(path)) as prof:
            mlp(torch.randn(4, D)).sum().backward()
            raise ValueError("boom")
    _no_hooks_left(mlp)
    assert prof.meta["error"] == "ValueError: boom"
    saved = memprof.load(str(path))
    assert saved.meta["error"] == "ValueError: boom"
    assert saved.peak == prof.peak > 0


def test_exception_without_path_still_saves(mlp, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError):
        with memprof.track(mlp):
            mlp(torch.randn(4, D))
            raise RuntimeError("CUDA out of memory (simulated by the test)")
    files = list(tmp_path.glob("memprof-*.memprof"))
    assert len(files) == 1
    assert "profile saved to" in capsys.readouterr().err
    assert memprof.load(str(files[0])).meta["error"].startswith("RuntimeError: CUDA out of memory")


def test_a_relative_path_is_where_the_block_started_when_the_code_changes_directory(
        mlp, tmp_path, monkeypatch):
    """hydra (< 1.2) runs each job in a new working directory: a relative path then put the
    profile inside that one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with memprof.track(mlp, path="run.memprof") as prof:
        os.chdir("outputs")
        mlp(torch.randn(4, D)).sum().backward()
    assert prof.saved == str(tmp_path / "run.memprof")
    assert memprof.load(prof.saved).peak == prof.peak > 0
    assert not (tmp_path / "outputs" / "run.memprof").exists()


def test_nested_and_repeated_blocks(mlp):
    with memprof.track(mlp) as outer:
        a = torch.empty(10_000, dtype=torch.uint8)
        with memprof.track() as inner:
            b = torch.empty(20_000, dtype=torch.uint8)
        c = torch.empty(30_000, dtype=torch.uint8)
    assert 20_000 in inner.memory["size"].tolist()
    assert 10_000 not in inner.memory["size"].tolist()
    assert {10_000, 20_000, 30_000} <= set(outer.memory["size"].tolist())
    for _ in range(2):
        with memprof.track() as again:
            d = torch.empty(40_000, dtype=torch.uint8)
        assert 40_000 in again.memory["size"].tolist()
    del a, b, c, d


def test_a_nested_block_over_a_model_made_inside_the_outer_one_profiles_as_a_block_alone():
    """What a script that calls track() itself gets under `memprof run` (the outer block): the
    model and optimizer are made after the outer block began, so their blocks are in neither
    the inner's events nor the outer's baseline. The inner profile names them as a block of
    its own would."""
    def train(prof_kwargs):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.ReLU(), torch.nn.Linear(H, C))
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        with memprof.track(model, optimizer=opt, **prof_kwargs) as prof:
            for _ in range(3):
                model(torch.randn(B, D)).sum().backward()
                opt.step()
                opt.zero_grad()
        return prof, param_bytes(model)

    alone, P = train({})
    with memprof.track(auto_modules=True) as outer:   # what `memprof run` opens around a script
        inner, _ = train({})
    for prof in (alone, inner):
        cats = prof.breakdown("category")
        assert cats["parameters"] == P
        # Adam's two moments and a step counter per parameter, made in step 0
        assert 2 * P < cats["optimizer_state"] <= 2 * P + 4 * 4 * F32
    assert inner.breakdown("category") == alone.breakdown("category")
    assert inner.peak == alone.peak
    assert outer.breakdown("category")["parameters"] == P


def test_a_nested_block_over_what_the_outer_block_does_not_watch_says_so():
    """track(b, opt_b) inside track(a, opt_a): the inner profile put all of b's memory outside
    any module, in one step, silently. It says so at its start; a block over the outer's own
    model, or inside `memprof run`'s auto mode, does not."""
    torch.manual_seed(0)
    a, b = (torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Linear(H, C)) for _ in "ab")
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b))
    with memprof.track(a, opt_a):
        with pytest.warns(RuntimeWarning, match="its model's modules and its optimizer's steps"):
            with memprof.track(b, opt_b):
                pass
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with memprof.track(a[0]):
                pass
            with memprof.track(a, opt_a):
                pass
    with memprof.track(auto_modules=True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with memprof.track(b):
                pass


def test_manual_steps_without_optimizer(mlp):
    with memprof.track(mlp) as prof:
        for i in range(3):
            mlp(torch.randn(4 + i, D)).sum().backward()
            prof.step()
    assert len(prof.steps) == 3
    assert prof.steps[2].peak > 0


def test_save_load_round_trip_and_bad_files(mlp, tmp_path):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9)
    with memprof.track(mlp, opt, health=True) as prof:
        for _ in range(3):
            loss = mlp(torch.randn(B, D)).sum()
            loss.backward()
            opt.step()
            prof.log(loss=loss.item())
    path = str(tmp_path / "run.memprof")
    prof.save(path)
    back = memprof.load(path)
    assert np.array_equal(back.events, prof.events)
    assert back.summary() == prof.summary()
    # as the tracker's (a loaded profile had neither: AttributeError)
    assert back.throughput == prof.throughput and back.throughput["steps"] == 3
    assert back.health == prof.health and back.health["steps"] == 3
    bad = tmp_path / "bad.memprof"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(ProfileFormatError, match="bad.memprof: not a readable memprof profile"):
        memprof.load(str(bad))
    with pytest.raises(ProfileFormatError, match="no such file"):
        memprof.load(str(tmp_path / "missing.memprof"))
    import json
    import zipfile
    wrong = tmp_path / "v99.memprof"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(wrong, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "header.json":
                h = json.loads(data)
                h["version"] = 99
                data = json.dumps(h).encode()
            dst.writestr(name, data)
    with pytest.raises(ProfileFormatError, match="version 99"):
        memprof.load(str(wrong))


def test_bad_arguments_get_one_line_errors(mlp):
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        memprof.track("resnet")
    with pytest.raises(TypeError, match="optimizer: expected a torch.optim.Optimizer"):
        memprof.track(mlp, optimizer=3)
    with memprof.track(mlp) as prof:
        mlp(torch.randn(2, D))
    with pytest.raises(ValueError, match="by='size'"):
        prof.breakdown(by="size")
    with pytest.raises(ValueError, match="at=5"):
        prof.breakdown(at=5)


def test_summary_is_json_and_activations_by_module(mlp):
    import json
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    with memprof.track(mlp, opt) as prof:
        mlp(torch.randn(B, D)).sum().backward()
        opt.step()
    summary = json.loads(json.dumps(prof.summary()))
    assert summary["peak_bytes"] == prof.peak
    acts = prof.activations_by_module()
    assert acts["act"] == B * H * F32       # ReLU output, saved for backward
    assert acts["fc2"] == B * C * F32       # logits (the model's output)
    assert "fc1" not in acts                # fc1's output is freed by ReLU's forward


def test_backward_on_another_thread_is_attributed(mlp):
    x = torch.randn(B, D)
    with memprof.track(mlp) as prof:
        loss = mlp(x).sum()
        th = threading.Thread(target=loss.backward)
        th.start()
        th.join()
    mem = prof.memory
    bwd = mem[(mem["node"] >= 0) & (mem["size"] > 0)]
    assert bwd.size > 0
    assert (bwd["thread"] != mem["thread"][mem["phase"] == 1][0]).all()
    assert "AddmmBackward0" in {prof.strings[n] for n in bwd["node"]}


def test_nested_block_sees_only_its_events_with_threads():
    with memprof.track() as outer:
        keep = torch.empty(11_111, dtype=torch.uint8)

        def work():
            for _ in range(50):
                torch.empty(777, dtype=torch.uint8)
        th = threading.Thread(target=work)
        th.start()
        th.join()
        del keep
        with memprof.track() as inner:
            x = torch.empty(33_333, dtype=torch.uint8)
    sizes = inner.memory["size"].tolist()
    assert sizes == [33_333]
    assert 777 in outer.memory["size"].tolist()
    del x


def test_phase_returns_to_other_after_backward(mlp):
    with memprof.track(mlp) as prof:
        mlp(torch.randn(4, D)).sum().backward()
        after = torch.empty(12_345, dtype=torch.uint8)
    mem = prof.memory
    i = mem["size"].tolist().index(12_345)
    assert prof.describe_event(i)["phase"] == "other"
    del after


def test_categories_survive_hitting_the_event_cap(mlp):
    opt = torch.optim.Adam(mlp.parameters())
    with pytest.warns(RuntimeWarning, match="dropped"):
        with memprof.track(mlp, opt, capacity=40) as prof:
            for _ in range(2):
                mlp(torch.randn(B, D)).sum().backward()
                opt.step()
    cats = prof.breakdown("category", at="end")
    assert cats["parameters"] == param_bytes(mlp)   # named through the snapshot markers


def test_a_block_entered_in_a_deleted_directory_records_and_ends(mlp, tmp_path, monkeypatch):
    """Reading the block's directory raised after tracking had started: it stayed on, and
    every later block read as nested in it."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with memprof.track(mlp, path=str(tmp_path / "x.memprof")) as prof:
        mlp(torch.randn(4, D)).sum().backward()
    assert prof.saved == str(tmp_path / "x.memprof")
    assert memprof.load(prof.saved).peak == prof.peak > 0
    assert not _C.is_active()


def test_a_run_that_raises_in_its_first_step_has_no_finished_step(tmp_path):
    """An error before the first optimizer step (an OOM in step 0, a rank that fails at
    once) read "steps 1", as if that step had finished; a run without any optimizer that
    ends normally is still one step."""
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        with memprof.track(model, opt, path=str(tmp_path / "failed.memprof")):
            model(torch.randn(4, 8)).sum().backward()
            raise RuntimeError("out of memory in step 0")
    except RuntimeError:
        pass
    failed = memprof.load(str(tmp_path / "failed.memprof"))
    assert failed.partial_last_step and failed.steps_label == "0 + partial"
    with memprof.track(model) as prof:   # no optimizer, no error: the whole run, one step
        model(torch.randn(4, 8)).sum().backward()
    assert not prof.partial_last_step and prof.steps_label == "1"


def test_a_profile_its_path_cannot_take_is_saved_in_the_temporary_directory(
        tmp_path, monkeypatch, capsys):
    """The directory went away (or its disk filled) while the block ran: the profile was
    lost after the whole run. It is saved in the temporary directory instead, and said so."""
    import shutil
    import tempfile
    (tmp_path / "out").mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    model = torch.nn.Linear(4, 2)
    with memprof.track(model, path=str(tmp_path / "out" / "run.memprof")) as prof:
        model(torch.randn(3, 4)).sum().backward()
        shutil.rmtree(tmp_path / "out")
    err = capsys.readouterr().err
    assert prof.saved is not None and os.path.dirname(prof.saved) == str(tmp_path / "tmp")
    assert os.path.basename(prof.saved).endswith("run.memprof")
    assert f"could not save the profile to {tmp_path / 'out' / 'run.memprof'}" in err
    assert f"saved it to {prof.saved} instead" in err
    assert memprof.load(prof.saved).peak == prof.peak
