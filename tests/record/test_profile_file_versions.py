"""The profile file's version says what a reader must understand. A snapshot's `trainable`
may hold 2 ('not trained': a model beside the trained one, an EMA or a teacher) since the EMA
change, but the version stayed 2: an older memprof read such a file as its own version and
refused it with 'snapshots[3].trainable: expected one 0 or 1 per ptr', as if the file were
damaged. Files with the value are version 3; version 2 files (which lack it) still load; a
file newer than this build says so in one line, with the versions this build reads."""
import copy
import io
import json
import zipfile

import pytest
import torch

import memprof
from memprof import ProfileFormatError
from memprof.analyse import summary
from memprof.profile_file import FORMAT_VERSION

pytestmark = pytest.mark.usefixtures("collect_garbage_after")


def _nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _train(with_ema: bool):
    """memprof run's recording of a small model (and an EMA copy beside it)."""
    torch.manual_seed(0)
    with memprof.track(auto_modules=True) as prof:
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                                    torch.nn.Linear(64, 4))
        ema = copy.deepcopy(model).requires_grad_(False) if with_ema else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(3):
            model(torch.randn(8, 32)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(list(ema.parameters()),
                                         [p.detach() for p in model.parameters()], 0.01)
                    ema(torch.randn(2, 32))
    return prof, model, ema


def _header(path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read("header.json"))


def _with_version(src, dst, version) -> None:
    """The file at `src` rewritten with another version in its header (the arrays' checksums
    cover the arrays, which stay)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == "header.json":
                header = json.loads(data)
                header["version"] = version
                data = json.dumps(header).encode()
            zout.writestr(name, data)


def test_a_profile_with_not_trained_parameters_round_trips_as_version_3(tmp_path):
    prof, model, ema = _train(with_ema=True)
    split = summary(prof)["parameters_at_peak"]
    assert split["not_trained"] == _nbytes(ema)
    path = prof.save(str(tmp_path / "ema.memprof"))
    header = _header(path)
    assert header["version"] == FORMAT_VERSION == 3
    assert any(2 in (s.get("trainable") or ()) for s in header["snapshots"])
    assert summary(memprof.load(path))["parameters_at_peak"] == split


def test_a_version_2_file_still_loads(tmp_path):
    prof, model, _ = _train(with_ema=False)
    path = prof.save(str(tmp_path / "new.memprof"))
    old = tmp_path / "old.memprof"
    _with_version(path, old, 2)    # what a build before the value wrote: 0 and 1 only
    loaded = memprof.load(str(old))
    assert summary(loaded)["parameters_at_peak"] == summary(prof)["parameters_at_peak"] == {
        "trainable": _nbytes(model), "frozen": 0, "not_trained": 0}
    assert loaded.peak == prof.peak


def test_a_version_2_file_with_not_trained_parameters_loads(tmp_path):
    """The build that brought 'not trained' (2) wrote it under version 2: its users' files."""
    prof, _, ema = _train(with_ema=True)
    path = prof.save(str(tmp_path / "ema.memprof"))
    old = tmp_path / "old.memprof"
    _with_version(path, old, 2)
    assert summary(memprof.load(str(old)))["parameters_at_peak"]["not_trained"] == _nbytes(ema)


def test_a_file_from_a_newer_memprof_says_so_in_one_line(tmp_path):
    prof, _, _ = _train(with_ema=False)
    path = prof.save(str(tmp_path / "run.memprof"))
    newer = tmp_path / "newer.memprof"
    _with_version(path, newer, FORMAT_VERSION + 1)
    with pytest.raises(ProfileFormatError) as err:
        memprof.load(str(newer))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(newer))
    assert f"written by a newer memprof (profile format version {FORMAT_VERSION + 1})" in msg
    assert f"this memprof reads versions 2 to {FORMAT_VERSION}" in msg
    assert "upgrade memprof" in msg


def test_a_file_older_than_this_build_reads_says_so(tmp_path):
    prof, _, _ = _train(with_ema=False)
    path = prof.save(str(tmp_path / "run.memprof"))
    older = tmp_path / "older.memprof"
    _with_version(path, older, 1)
    with pytest.raises(ProfileFormatError) as err:
        memprof.load(str(older))
    msg = str(err.value)
    assert "\n" not in msg
    assert "profile format version 1, written by an older memprof" in msg
    assert f"this memprof reads versions 2 to {FORMAT_VERSION}" in msg
