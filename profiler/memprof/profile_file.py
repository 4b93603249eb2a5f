"""The profile file: a zip of a JSON header and numpy arrays, versioned and checksummed, and
written atomically (a temporary file next to the target, then a rename), so a crash or a
second Ctrl-C while saving never leaves a half-written profile under the target's name."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from dataclasses import asdict

import numpy as np

from .finding import Finding
from .record.events import EVENT_DTYPE, SEQ_DTYPE
from .record.snapshots import Snapshot
from .run import Run

FORMAT_NAME = "memprof-profile"
FORMAT_VERSION = 2   # 2: 72-byte event record without leaf_op; recorder records; checksums


class ProfileFormatError(ValueError):
    """A file that is not a memprof profile, or one of an unsupported version."""


def write(run: Run, findings: list[Finding], path: str) -> str:
    arrays = {"events.npy": _npy_bytes(run.events), "seq_records.npy": _npy_bytes(run.seq_records)}
    header = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "strings": run.strings, "modules": run.modules,
        "snapshots": [asdict(s) for s in run.snapshots],
        "meta": {k: v for k, v in run.meta.items() if _jsonable(v)},
        "step_seqs": [int(s) for s in run.step_seqs],
        "records": {k: v for k, v in run.records.items() if _jsonable(v)},
        "findings": [f.as_dict() for f in findings],
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in arrays.items()},
    }
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".memprof-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("header.json", json.dumps(header, default=_plain))
            for name, data in arrays.items():
                zf.writestr(name, data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def read(path: str) -> tuple[Run, list[Finding]]:
    try:
        with zipfile.ZipFile(path) as zf:
            header = json.loads(zf.read("header.json"))
            if header.get("format") != FORMAT_NAME:
                raise ProfileFormatError(f"{path}: not a memprof profile")
            if header.get("version") != FORMAT_VERSION:
                raise ProfileFormatError(
                    f"{path}: profile format version {header.get('version')}, this memprof "
                    f"reads version {FORMAT_VERSION}")
            arrays = {}
            for name in ("events.npy", "seq_records.npy"):
                data = zf.read(name)
                expected = header.get("sha256", {}).get(name)
                if expected != hashlib.sha256(data).hexdigest():
                    raise ProfileFormatError(f"{path}: {name} is damaged (checksum mismatch)")
                arrays[name] = np.load(io.BytesIO(data), allow_pickle=False)
    except ProfileFormatError:
        raise
    except FileNotFoundError:
        raise ProfileFormatError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as exc:
        raise ProfileFormatError(f"{path}: not a readable memprof profile ({exc})") from None
    events, seqs = arrays["events.npy"], arrays["seq_records.npy"]
    if events.dtype != EVENT_DTYPE or seqs.dtype != SEQ_DTYPE:
        raise ProfileFormatError(f"{path}: event layout does not match this memprof")
    run = Run(events=events, strings=header["strings"], modules=header["modules"],
              seq_records=seqs, snapshots=[Snapshot(**s) for s in header["snapshots"]],
              meta=header["meta"], step_seqs=header.get("step_seqs", []),
              records=header.get("records", {}))
    return run, [Finding(**f) for f in header.get("findings", [])]


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _plain(v):
    """numpy scalars in records -> Python numbers."""
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def _jsonable(v) -> bool:
    try:
        json.dumps(v, default=_plain)
        return True
    except (TypeError, ValueError):
        return False
