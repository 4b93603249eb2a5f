"""The profile reader is total and bounded (issue 15, item 4): every damaged, truncated,
hand-edited or hostile file gives one ProfileFormatError line naming the file, quickly; a file
that loads answers its summary and its report."""
import io
import json
import os
import random
import struct
import time
import zipfile
from hashlib import sha256

import numpy as np
import pytest
import torch
from rich.console import Console

import memprof
from memprof import ProfileFormatError


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kept = []   # a retained graph per step: the file has findings with holders
    with memprof.track(model, opt) as prof:
        for _ in range(3):
            loss = model(torch.randn(8, 16)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            kept.append(loss)
            prof.log(loss=loss.item())
    path = tmp_path_factory.mktemp("good") / "good.memprof"
    prof.save(str(path))
    return path.read_bytes()


def _outcome(path) -> str:
    """'error' (one ProfileFormatError line naming the file) or 'ok' (loads and reports)."""
    try:
        prof = memprof.load(str(path))
    except ProfileFormatError as err:
        msg = str(err)
        assert "\n" not in msg and msg.startswith(str(path)), msg
        return "error"
    prof.summary()
    prof.report(console=Console(file=io.StringIO(), width=200))
    return "ok"


def test_byte_flip_sweep_sampled(good, tmp_path):
    rng = random.Random(15)
    n = len(good)
    # the zip's structures sit at both ends; the rest is compressed data, sampled
    positions = sorted(set(range(64)) | set(range(max(0, n - 200), n))
                       | set(rng.sample(range(n), min(n, 250))))
    path = tmp_path / "flipped.memprof"
    seen = {"ok": 0, "error": 0}
    start = time.monotonic()
    for i in positions:
        data = bytearray(good)
        data[i] ^= rng.choice((0xFF, 0x01, 0x80, rng.randrange(1, 256)))
        path.write_bytes(bytes(data))
        seen[_outcome(path)] += 1
    assert seen["error"] > 0.5 * sum(seen.values())
    assert time.monotonic() - start < 40


def test_truncated_and_padded_files(good, tmp_path):
    path = tmp_path / "cut.memprof"
    for size in sorted(set(random.Random(1).sample(range(len(good)), 60)) | {0, 1, 4, 22}):
        path.write_bytes(good[:size])
        assert _outcome(path) == "error", size
    path.write_bytes(good + b"\0" * 1000)   # trailing bytes: a zip still reads; fine either way
    _outcome(path)


def test_special_files_are_refused_in_bounded_time(tmp_path):
    for special in ("/dev/zero", "/dev/urandom", str(tmp_path)):
        if not os.path.exists(special):
            continue
        start = time.monotonic()
        with pytest.raises(ProfileFormatError, match="not a regular file"):
            memprof.load(special)
        assert time.monotonic() - start < 2


def _rezip(good: bytes, path, edit_header=None, edit_member=None) -> None:
    """Rewrite the profile with a hand-edited header or member (valid zip CRCs)."""
    with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(path, "w") as dst:
        members = {name: src.read(name) for name in src.namelist()}
        header = json.loads(members["header.json"])
        if edit_member:
            name, data = edit_member(members)
            members[name] = data
            header.setdefault("sha256", {})[name] = sha256(data).hexdigest()   # consistent
        if edit_header:
            header = edit_header(header)
        members["header.json"] = json.dumps(header).encode()
        for name, data in members.items():
            dst.writestr(name, data)


def _set(key, value):
    def edit(h):
        h[key] = value
        return h
    return edit


def _nested(outer, key, value):
    def edit(h):
        if isinstance(h.get(outer), list):
            h[outer][0][key] = value
        else:
            h.setdefault(outer, {})[key] = value
        return h
    return edit


HOSTILE_HEADERS = {
    "not an object": lambda h: [h],
    "no strings": lambda h: {k: v for k, v in h.items() if k != "strings"},
    "strings not a list": _set("strings", "abc"),
    "modules not strings": _set("modules", [1, 2]),
    "strings emptied": _set("strings", []),
    "modules emptied": _set("modules", []),
    "snapshot without fields": _set("snapshots", [{"marker": 0}]),
    "snapshot category out of range": _nested("snapshots", "category", 99),
    "snapshot marker out of range": _nested("snapshots", "marker", 10 ** 9),
    "snapshot modules not matching ptrs": _nested("snapshots", "modules", [0]),
    "finding without fields": _set("findings", [{"kind": "x"}]),
    "finding bytes a string": _nested("findings", "bytes", "many"),
    "meta a list": _set("meta", []),
    "meta t0 a string": _nested("meta", "t0_ns", "abc"),
    "records a list": _set("records", []),
    "records logs malformed": _nested("records", "logs", [[1]]),
    "sha256 a string": _set("sha256", "x"),
    "step_seqs strings": _set("step_seqs", ["a"]),
    "format missing": lambda h: {k: v for k, v in h.items() if k != "format"},
    "version true": _set("version", True),
}


@pytest.mark.parametrize("edit", list(HOSTILE_HEADERS.values()), ids=list(HOSTILE_HEADERS))
def test_hand_edited_headers_give_one_line(good, tmp_path, edit):
    path = tmp_path / "edited.memprof"
    _rezip(good, path, edit_header=edit)
    with pytest.raises(ProfileFormatError) as err:
        memprof.load(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_version_as_a_string_is_not_called_the_version_we_read(good, tmp_path):
    version = json.loads(zipfile.ZipFile(io.BytesIO(good)).read("header.json"))["version"]
    path = tmp_path / "v.memprof"
    _rezip(good, path, edit_header=_set("version", str(version)))
    with pytest.raises(ProfileFormatError) as err:
        memprof.load(str(path))
    msg = str(err.value)
    assert f"version {version}, this memprof reads version {version}" not in msg
    assert repr(str(version)) in msg


def _npy_with_shape(members, count):
    """events.npy whose header claims `count` records (same header length)."""
    data = members["events.npy"]
    buf = io.BytesIO(data)
    np.lib.format.read_magic(buf)
    np.lib.format.read_array_header_1_0(buf)
    head = data[:buf.tell()].decode("latin1")
    old = head[head.index("'shape': (") + 10:head.index(",)")]
    new_head = head.replace(f"'shape': ({old},)", f"'shape': ({count},)")
    new_head = new_head[:len(head) - 1].ljust(len(head) - 1) + "\n"
    return "events.npy", new_head.encode("latin1") + data[buf.tell():]


@pytest.mark.parametrize("count", [10 ** 12, 1, 0])
def test_array_shape_that_lies_about_its_data(good, tmp_path, count):
    path = tmp_path / "shape.memprof"
    _rezip(good, path, edit_member=lambda m: _npy_with_shape(m, count))
    start = time.monotonic()
    with pytest.raises(ProfileFormatError, match="shape"):
        memprof.load(str(path))
    assert time.monotonic() - start < 2


def test_declared_sizes_are_checked_before_reading(good, tmp_path):
    """A zip directory that declares a huge member (a zip bomb, or damage) is refused from
    the directory alone: nothing is decompressed."""
    data = bytearray(good)
    central = data.index(b"PK\x01\x02")
    while central >= 0:
        name_len = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46:central + 46 + name_len] == b"events.npy":
            struct.pack_into("<I", data, central + 24, 0xFFFFFFF0)   # uncompressed size
        central = data.find(b"PK\x01\x02", central + 4)
    path = tmp_path / "bomb.memprof"
    path.write_bytes(bytes(data))
    with pytest.raises(ProfileFormatError, match="declares"):
        memprof.load(str(path))
