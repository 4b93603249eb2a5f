"""memprof.track(path=..., autosave=S): the profile so far is saved at step ends while the block
runs (marked partial), replaced by the block's own save at its end; a save is skipped when the
host has too little memory for it; the time of each save is not the loop's."""
import os
import time

import pytest
import torch

import memprof
from memprof import track_autosave
from memprof.analyse import throughput


def _training():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    return model, opt, losses


def _step(model, opt, losses, kept=None):
    x = torch.randn(8, 16)
    loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 4, (8,)))
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if kept is not None:
        kept.append(loss)   # the graph of every step, kept: a retained-graph leak


def test_the_file_holds_the_run_so_far_while_it_runs_then_the_whole_run(tmp_path):
    path = tmp_path / "run.memprof"
    model, opt, losses = _training()
    kept = []
    seen = []
    with memprof.track(model, opt, path=str(path), autosave=0.05):
        for i in range(2000):
            _step(model, opt, losses, kept)
            if path.exists() and (not seen or path.stat().st_mtime_ns != seen[-1][0]):
                seen.append((path.stat().st_mtime_ns, i))
                assert memprof.load(str(path)).meta["partial"]["steps_ended"] == i + 1
            if len(seen) >= 2:
                break
            time.sleep(0.002)
    assert len(seen) >= 2, "expected two saves while the block ran"
    steps_done = len(losses)
    final = memprof.load(str(path))
    assert "partial" not in final.meta   # the block's own save replaced the last partial one
    saves = final.run.records["autosave"]["saves"]
    assert len(saves) == len(seen) and all(s > 0 and t > 0 for s, t in saves)
    assert len(final.steps) == steps_done
    # the loop's time per step leaves the saves out (as the leak probe's looks)
    summary = throughput.summarize(final, warmup=0)
    assert summary["steps_measured"] >= steps_done - 2
    leaks = [f for f in final.findings if f.kind == "retained_graph"]
    assert leaks and "kept" in leaks[0].holder


def test_a_partial_profile_is_marked_and_names_the_leak_seen_so_far(tmp_path):
    path = tmp_path / "run.memprof"
    model, opt, losses = _training()
    kept = []
    with memprof.track(model, opt, path=str(path), autosave=30.0) as prof:
        for _ in range(6):
            _step(model, opt, losses, kept)
        saver = prof._autosave
        assert saver.save_now() == str(path)   # as a due save does at a step end
        partial = memprof.load(str(path))
        for _ in range(2):
            _step(model, opt, losses, kept)
    assert partial.meta["partial"]["steps_ended"] == 6
    assert partial.meta["partial"]["elapsed_s"] > 0
    assert len(partial.steps) == 6 and partial.meta["steps_marked"] == 6
    leaks = [f for f in partial.findings if f.kind == "retained_graph"]
    assert leaks and leaks[0].holder.endswith(".<locals>.kept")
    final = memprof.load(str(path))
    assert "partial" not in final.meta and len(final.steps) == 8
    # the tracked results are the run's own: the same losses as the same loop untracked
    model2, opt2, losses2 = _training()
    for _ in range(8):
        _step(model2, opt2, losses2)
    assert losses2 == losses


def test_a_save_is_skipped_when_the_host_has_too_little_memory_for_it(tmp_path, monkeypatch):
    path = tmp_path / "run.memprof"
    monkeypatch.setattr(track_autosave, "available_memory", lambda: 1024)
    model, opt, losses = _training()
    with memprof.track(model, opt, path=str(path), autosave=30.0) as prof:
        for _ in range(3):
            _step(model, opt, losses)
        assert prof._autosave.save_now() is None
        assert not path.exists()
    rec = memprof.load(str(path)).run.records["autosave"]
    assert rec["saves"] == [] and "available" in rec["skipped"][0]


def test_no_path_or_none_saves_nothing_before_the_end(tmp_path):
    model, opt, losses = _training()
    with memprof.track(model, opt, autosave=0.01) as prof:
        assert prof._autosave is None
    with memprof.track(model, opt, path=str(tmp_path / "a.memprof"), autosave=None) as prof:
        assert prof._autosave is None
        _step(model, opt, losses)
    assert "autosave" not in memprof.load(str(tmp_path / "a.memprof")).run.records


@pytest.mark.parametrize("bad", [-1, "60", True, float("nan"), float("inf")])   # (0: the end only)
def test_a_bad_autosave_is_one_clear_error(bad):
    with pytest.raises(ValueError, match=r"autosave=.*expected a number of seconds > 0"):
        memprof.track(path="x.memprof", autosave=bad)


def test_a_model_built_inside_the_block_has_its_parameters_named_in_a_partial_profile(tmp_path):
    """`memprof run` builds the model inside the block: its parameters were noted at the
    block's end only (final()), so a partial profile read them as "other"."""
    path = tmp_path / "run.memprof"
    with memprof.track(path=str(path), auto_modules=True, autosave=30.0) as prof:
        model, opt, losses = _training()
        for _ in range(3):
            _step(model, opt, losses)
        prof._autosave.save_now()
        partial = memprof.load(str(path))
    final = memprof.load(str(path))
    params = sum(p.numel() * 4 for p in model.parameters())
    for prof_ in (partial, final):
        at_end = prof_.breakdown("category", at="end")
        assert at_end["parameters"] == params
        assert at_end["gradients"] == params   # zero_grad() before backward: kept after step
        assert at_end["other"] == 0


def test_the_room_under_a_containers_memory_limit_counts(tmp_path):
    """A container's OOM kill (exit 137) comes from its cgroup's limit, not the host's
    MemAvailable: the least room left under this cgroup and its parents is what a save has."""
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    (root / "job" / "step").mkdir(parents=True)
    (root / "job" / "memory.max").write_text("1073741824\n")      # 1 GiB
    (root / "job" / "memory.current").write_text("805306368\n")   # 768 MiB used
    (root / "job" / "step" / "memory.max").write_text("max\n")
    (root / "job" / "step" / "memory.current").write_text("100\n")
    proc.write_text("0::/job/step\n")
    assert track_autosave.cgroup_headroom(str(proc), str(root)) == 256 << 20
    (root / "job" / "memory.max").write_text("max\n")
    assert track_autosave.cgroup_headroom(str(proc), str(root)) is None
    v1 = root / "memory" / "slurm" / "job_7"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(4 << 30))
    (v1 / "memory.usage_in_bytes").write_text(str(3 << 30))
    proc.write_text("12:cpuset:/slurm/job_7\n11:memory:/slurm/job_7\n")
    assert track_autosave.cgroup_headroom(str(proc), str(root)) == 1 << 30
    assert track_autosave.cgroup_headroom(str(tmp_path / "none"), str(root)) is None


def test_a_failed_save_is_noted_once_and_a_temporary_left_by_a_killed_save_goes(
        tmp_path, monkeypatch):
    path = tmp_path / "run.memprof"
    old = time.time() - 3600

    def temporary(name, age=old):
        f = tmp_path / name
        f.write_bytes(b"half a profile")
        os.utime(f, (age, age))
        return f
    # a save that a SIGKILL stopped mid-write left its temporary (a pid that is not running)
    stale = temporary(".memprof-run.memprof.999999999.abcd1234.tmp")
    kept = [temporary(f".memprof-run.memprof.{os.getpid()}.abcd1234.tmp"),   # a live writer's
            temporary(".memprof-run.memprof.999999998.abcd1234.tmp", time.time()),  # written now
            temporary(".memprof-run.memprof.5.999999999.abcd1234.tmp"),   # target run.memprof.5
            temporary(".memprof-run.memprof.\u00b2.abcd1234.tmp"),        # not a pid
            temporary(".memprof-run.memprof.99999999999999999999.abcd1234.tmp")]
    model, opt, losses = _training()
    calls = []

    def failing(self):
        calls.append(1)
        raise OSError("No space left on device")
    monkeypatch.setattr(track_autosave.Autosave, "save_now", failing)
    with memprof.track(model, opt, path=str(path), autosave=0.01):
        assert not stale.exists() and all(f.exists() for f in kept)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.3:
            _step(model, opt, losses)
    assert calls   # it was due and tried
    rec = memprof.load(str(path)).run.records["autosave"]
    assert rec["skipped"] == ["OSError: No space left on device"]   # once, not per try


def test_a_target_with_a_long_name_is_still_saved(tmp_path):
    """The temporary file's name carries the target's: a name of 240 characters made one the
    file system refused (ENAMETOOLONG), and the block's own save failed with it."""
    path = tmp_path / ("r" * 232 + ".memprof")
    model, opt, losses = _training()
    with memprof.track(model, opt, path=str(path), autosave=30.0) as prof:
        _step(model, opt, losses)
        assert prof._autosave.save_now() == str(path)
    assert "partial" not in memprof.load(str(path)).meta


def test_saves_fall_on_the_interval_s_multiples_so_processes_stay_in_step():
    every = 60.0
    # a save made just past its multiple: the next is the next multiple, not the one after
    assert track_autosave.next_due(6060.0, 6060.4, every, took=0.1) == 6120.0
    # two ranks that saved at one multiple, a second apart, with different save times under
    # the interval: the same next multiple
    assert track_autosave.next_due(6060.0, 6061.3, every, took=1.1) == \
        track_autosave.next_due(6060.0, 6060.2, every, took=0.05) == 6120.0
    # a save of 2 s waits 50 x 2 s: the multiples that spacing needs
    assert track_autosave.next_due(6060.0, 6062.0, every, took=2.0) == 6180.0
    # step ends farther apart than the interval: the next multiple after now
    assert track_autosave.next_due(6060.0, 6200.0, every, took=0.1) == 6240.0


def test_a_saves_schedule_follows_the_wall_clocks_multiples_in_a_block(tmp_path, monkeypatch):
    """Simulated clocks: a step end every 0.5 s for 10 minutes, saves 0.1 s each - one save
    per minute (the due time had slipped to every second minute)."""
    clock = {"wall": 6000.3, "mono": 100.0}
    monkeypatch.setattr(track_autosave.time, "time", lambda: clock["wall"])
    monkeypatch.setattr(track_autosave.time, "monotonic", lambda: clock["mono"])
    saved = []

    class Saver(track_autosave.Autosave):
        def save_now(self):
            saved.append(clock["wall"])
            self.saves.append([len(saved), 0.1])
            clock["wall"] += 0.1
            clock["mono"] += 0.1
    saver = Saver(tracker=None, every=60.0)
    for _ in range(1200):
        clock["wall"] += 0.5
        clock["mono"] += 0.5
        saver._step_end()
    gaps = [round(b - a) for a, b in zip(saved, saved[1:])]
    assert round(saved[0]) == 6120 and set(gaps) == {60}, saved


def test_the_room_under_a_containers_memory_limit_counts_its_working_set(tmp_path):
    """Usage counts page cache the kernel reclaims first (a job reading its data sits at its
    limit by that count): the inactive file cache is left out, as the kubelet does. Slurm's
    cgroup v1 limits are on the job's cgroup above the task's; a container without a cgroup
    namespace sees its own cgroup at the mount's root."""
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    job = root / "memory" / "slurm" / "job_7"
    (job / "step_0" / "task_0").mkdir(parents=True)
    (job / "memory.limit_in_bytes").write_text(str(4 << 30))
    (job / "memory.usage_in_bytes").write_text(str(3 << 30))
    (job / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {1 << 30}\n")
    task = job / "step_0" / "task_0"
    (task / "memory.limit_in_bytes").write_text(str((1 << 63) - 4096))   # v1: no limit
    (task / "memory.usage_in_bytes").write_text("100")
    proc.write_text("11:memory:/slurm/job_7/step_0/task_0\n")
    assert track_autosave.cgroup_headroom(str(proc), str(root)) == 2 << 30
    docker = root / "memory"
    (docker / "memory.limit_in_bytes").write_text(str(2 << 30))
    (docker / "memory.usage_in_bytes").write_text(str(1 << 30))
    proc.write_text("4:memory:/docker/0123abcd\n")   # the host's path, not mounted here
    assert track_autosave.cgroup_headroom(str(proc), str(root)) == 1 << 30


@pytest.mark.parametrize("field, value", [
    ("partial", {"steps_ended": "x"}), ("partial", 3),
    ("autosave", {"saves": [["a", 0.1]]}), ("leak_probe", {"looks": [[1]]})])
def test_a_hand_edited_partial_mark_or_save_list_is_a_format_error(tmp_path, field, value):
    """The reports read these as numbers: a file that says otherwise is refused when read,
    one line, not a ValueError out of the report."""
    import json
    import zipfile
    from memprof.profile_file import ProfileFormatError
    path = tmp_path / "run.memprof"
    model, opt, losses = _training()
    with memprof.track(model, opt, path=str(path)):
        _step(model, opt, losses)
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    header = json.loads(members["header.json"])
    (header["meta"] if field == "partial" else header["records"])[field] = value
    members["header.json"] = json.dumps(header).encode()
    edited = tmp_path / "edited.memprof"
    with zipfile.ZipFile(edited, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(ProfileFormatError, match=f"edited.memprof: .*{field}"):
        memprof.load(str(edited))


def test_saves_its_path_cannot_take_go_to_the_temporary_directory_and_are_said(
        tmp_path, monkeypatch, capsys):
    """The directory went away (or its disk filled) during the run: every save failed with no
    word, and a run the OOM killer then ended left nothing. The saves go to the temporary
    directory, said once; the block's own save there too, and it is the one kept."""
    import shutil
    import tempfile
    (tmp_path / "out").mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    target = tmp_path / "out" / "run.memprof"
    fallback = tmp_path / "tmp" / f"memprof-{os.getpid()}-run.memprof"
    model, opt, losses = _training()
    with memprof.track(model, opt, path=str(target), autosave=0.02) as prof:
        shutil.rmtree(tmp_path / "out")
        t0 = time.monotonic()
        while not fallback.exists() and time.monotonic() - t0 < 30:
            _step(model, opt, losses)
            time.sleep(0.002)
        assert memprof.load(str(fallback)).meta["partial"]["steps_ended"] > 0
        said = capsys.readouterr().err
        assert said.count("memprof:") == 1 and \
            f"could not save the profile so far to {target}" in said and \
            f"saving it to {fallback}" in said
        for _ in range(30):
            _step(model, opt, losses)
            time.sleep(0.002)
        assert capsys.readouterr().err == ""   # once, not at every save
    assert prof.saved == str(fallback) and "partial" not in memprof.load(prof.saved).meta
    assert os.listdir(tmp_path / "tmp") == [fallback.name]


def test_a_fallback_save_goes_when_the_path_takes_the_last_one(tmp_path, monkeypatch):
    import tempfile
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    target = tmp_path / "out" / "run.memprof"
    (tmp_path / "out").mkdir()
    fallback = tmp_path / "tmp" / f"memprof-{os.getpid()}-run.memprof"
    model, opt, losses = _training()
    with memprof.track(model, opt, path=str(target), autosave=0.02) as prof:
        (tmp_path / "out").rmdir()
        t0 = time.monotonic()
        while not fallback.exists() and time.monotonic() - t0 < 30:
            _step(model, opt, losses)
            time.sleep(0.002)
        assert fallback.exists()
        (tmp_path / "out").mkdir()   # room again (a disk freed) before the block ends
    assert prof.saved == str(target) and not fallback.exists()
