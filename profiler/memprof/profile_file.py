"""The profile file: a zip of a JSON header and numpy arrays, versioned and checksummed, and
written atomically (a temporary file next to the target, then a rename), so a crash or a
second Ctrl-C while saving never leaves a half-written profile under the target's name."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import struct
import tempfile
import time
import zipfile
import zlib
from array import array
from dataclasses import fields

import numpy as np

from . import profile_schema
from .finding import Finding
from .record.events import EVENT_DTYPE, SEQ_DTYPE
from .record.snapshots import Snapshot
from .run import Run

FORMAT_NAME = "memprof-profile"
_SNAPSHOT_FIELDS = [f.name for f in fields(Snapshot)]
#: the version this build writes. What each changed (a reader must understand it):
#:   2: 72-byte event record without leaf_op; recorder records; checksums
#:   3: a snapshot's `trainable` may hold 2, 'not trained' (a model beside the trained one
#:      that no optimizer updates: an EMA, a teacher), which the one build before it wrote
#:      under version 2 already (read as written); and
#:      the category recomputed_weights (old-style weight_norm's weight, record.events)
FORMAT_VERSION = 3
#: the oldest version this build reads
OLDEST_READ_VERSION = 2


class ProfileFormatError(ValueError):
    """A file that is not a memprof profile, or one of an unsupported version."""


class UnwritablePath(ValueError):
    """A path where no profile can be written (`reason`: why, without the path: unwritable's
    words, which a save that falls back elsewhere repeats)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _umask() -> int:
    """The process's umask: from /proc on Linux; elsewhere by setting it and setting it back
    (for that instant another thread's new file would get 022)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FORMAT_AT_START = re.compile(rb'\s*\{\s*"format"\s*:\s*"' + re.escape(FORMAT_NAME.encode())
                              + rb'"')


def is_profile(path: str) -> bool:
    """Whether `path` is a memprof profile (any version): a file that may be overwritten
    with a new one, unlike a script or data a mistyped `-o` would destroy."""
    try:   # the header's first bytes (it begins with its format): every save asks, an
        # autosave too, and a long run's header (its snapshots, per-step records) is large
        with zipfile.ZipFile(path) as zf, zf.open("header.json") as header:
            start = header.read(256)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError, zlib.error):
        return False
    return _FORMAT_AT_START.match(start) is not None


def may_replace(path: str) -> bool:
    """Whether a profile may be written at `path`: nothing there, an empty file (a
    NamedTemporaryFile, a scheduler's placeholder) or a profile - not a script or data that a
    mistyped path would destroy."""
    if os.path.isdir(path):
        return False
    if os.path.exists(path) and not os.path.isfile(path):
        return False   # a device, FIFO or socket (its size reads 0: /dev/null was replaced)
    return not os.path.exists(path) or os.path.getsize(path) == 0 or is_profile(path)


def unwritable(path: str) -> str | None:
    """Why a file could not be written at `path` - a directory there, a missing directory, a
    file where a directory should be, a directory where no file can be made (read-only, /proc:
    tried, as access() passes for root), a name longer than the file system takes - or None.
    Asked before the work (a run, a tracked block, a report) as well as at a save; through a
    symbolic link, of the file it names (where write() saves)."""
    path = os.path.realpath(path) if os.path.islink(path) else path
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "is a directory; give a file name"
    if os.path.exists(path) and not os.path.isfile(path):
        # `-o /dev/null` as root replaced the device with a profile: every process lost it
        return ("is not a regular file (a device, FIFO or socket): a profile is a file of its "
                "own, written by replacing the path; give a file name")
    if not os.path.isdir(directory):
        above = _first_file_above(directory)
        if above is not None:
            return f"{above!r} is a file, not a directory"
        return f"directory {directory!r} does not exist"
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".memprof-", suffix=".check")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        return f"cannot create a file in {directory!r} ({err.strerror})"
    try:
        limit = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return None
    size = len(os.fsencode(os.path.basename(path)))
    if limit and size > limit:
        return f"a file name of {size} bytes; this file system takes names of at most {limit}"
    return None


def _first_file_above(directory: str) -> str | None:
    """The nearest existing path above a missing directory, where it is a file (`-o
    train.py/run.memprof`), else None."""
    while directory and not os.path.exists(directory):
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent
    return directory if directory and not os.path.isdir(directory) else None


def _listed(value):
    """A snapshot's field as JSON takes it (its addresses are an array('q') while recording)."""
    return value.tolist() if isinstance(value, array) else value


def write(run: Run, findings: list[Finding], path: str) -> str:
    header = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "strings": run.strings, "modules": run.modules,
        # as read, not copied (dataclasses.asdict deep-copies each address: a quarter of the
        # time of saving a 1M-event profile)
        "snapshots": [{f: _listed(getattr(s, f)) for f in _SNAPSHOT_FIELDS}
                      for s in run.snapshots],
        "meta": {k: v for k, v in run.meta.items() if _jsonable(v)},
        "step_seqs": [int(s) for s in run.step_seqs],
        "records": {k: v for k, v in run.records.items() if _jsonable(v)},
        "findings": [f.as_dict() for f in findings],
    }

    def write_zip(f) -> None:
        # deflate's fastest level: on a 1M-event profile (69 MiB of events) 0.32 s and 15 % of
        # the bytes against level 6's 1.01 s and 12 % (this 2-core machine) - the save is part
        # of leaving a block, and of every autosave while training waits
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            # the arrays streamed into the zip as they are hashed (no bytes copy of the events,
            # which a save near the host's memory limit cannot afford), the header after them
            header["sha256"] = {name: _write_npy(zf, name, array) for name, array in
                                (("events.npy", run.events), ("seq_records.npy", run.seq_records))}
            zf.writestr("header.json", json.dumps(header, default=_plain))
    return write_atomically(path, write_zip)


def write_atomically(path: str, write) -> str:
    """`write(f)` into a temporary file beside `path`, renamed over it once complete: a
    reader never sees half a file, and processes writing the same name leave one whole
    file. Through a symbolic link, the file it names is replaced (the rename replaced the
    link itself and left its target stale). The path written is returned."""
    path = os.path.realpath(path) if os.path.islink(path) else path
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f"{_temporary_stem(path)}{os.getpid()}.", suffix=".tmp",
                               dir=directory)
    try:
        # mkstemp makes the file 0600; the file gets the mode any new file would (umask)
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


#: a temporary file's name: `.memprof-<the target's name, cut>.<pid>.<mkstemp's 8>.tmp` (the
#: name cut so that a target of 255 characters still has a temporary the file system takes)
_TEMPORARY_NAME_CHARS = 64
#: a temporary file left alone this long was not being written (a save streams its bytes): on
#: a shared file system its pid may be another host's, which the pid check cannot see
STALE_TEMPORARY_S = 120.0


def _temporary_stem(path: str) -> str:
    return f".memprof-{os.path.basename(path)[:_TEMPORARY_NAME_CHARS]}."


def remove_stale_temporaries(path: str) -> list[str]:
    """Delete the temporary files that saves to `path` by processes no longer running left
    behind (a process killed outright while it wrote: SIGKILL runs no cleanup, and a save of
    a long run's profile is hundreds of MB); the files removed. Only names this writer makes
    for `path`, untouched for STALE_TEMPORARY_S, of a pid not running here."""
    path = os.path.realpath(path) if os.path.islink(path) else path
    directory = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(re.escape(_temporary_stem(path)) + r"([0-9]{1,10})\.[a-z0-9_]{8}\.tmp",
                         re.ASCII)
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        found = pattern.fullmatch(name)
        if found is None or _running(int(found.group(1))):
            continue
        full = os.path.join(directory, name)
        try:
            if now - os.stat(full).st_mtime < STALE_TEMPORARY_S:
                continue
            os.unlink(full)
            removed.append(name)
        except OSError:
            pass
    return removed


def _running(pid: int) -> bool:
    """Whether process `pid` runs on this host (another user's included)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):   # none; no process has such a number
        return False
    except OSError:   # EPERM: another user's process
        pass
    return True


class _Hashing:
    """A write-only stream that hashes what passes through it to another."""

    def __init__(self, out):
        self.out, self.sha = out, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.out.write(data)


def _write_npy(zf: zipfile.ZipFile, name: str, array: np.ndarray) -> str:
    """`array` as the .npy member `name`; its SHA-256."""
    with zf.open(name, "w", force_zip64=True) as member:
        stream = _Hashing(member)
        np.save(stream, array, allow_pickle=False)
    return stream.sha.hexdigest()


# Bounds checked before anything is read: the reader's memory is at most the sizes the zip
# directory declares, and those are checked against the file's own size first.
MAX_HEADER_BYTES = 1 << 30          # the JSON header (strings, modules, snapshots, records)
MAX_ARRAY_BYTES = 1 << 36           # one array (events: 72 bytes each)
_DEFLATE_RATIO = 1100               # deflate expands at most ~1032x


#: what reading a damaged, truncated or foreign file raises (RuntimeError: an encrypted
#: member; NotImplementedError: an unknown compression)
_UNREADABLE = (zipfile.BadZipFile, zlib.error, KeyError, ValueError, OSError, EOFError,
               NotImplementedError, RuntimeError, RecursionError, struct.error)


def read(path: str) -> tuple[Run, list[Finding]]:
    """The Run and findings saved at `path`. Total and bounded: any damaged, truncated,
    hand-edited or hostile file raises ProfileFormatError, one line naming the file and what
    is wrong, after reading at most what the file's zip directory declares (checked first)."""
    try:
        header, events, seqs = _read_checked(path)
    except ProfileFormatError:
        raise
    except FileNotFoundError:
        raise ProfileFormatError(f"{path}: no such file") from None
    except _UNREADABLE as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ProfileFormatError(f"{path}: not a readable memprof profile: truncated, damaged "
                                 f"or another kind of file ({detail})") from None
    run = Run(events=events, strings=header["strings"], modules=header["modules"],
              seq_records=seqs, snapshots=[Snapshot(**s) for s in header["snapshots"]],
              meta=header["meta"], step_seqs=header["step_seqs"], records=header["records"])
    return run, profile_schema.findings_of(header)


def read_meta(path: str) -> dict | None:
    """The run's meta saved at `path` (its header alone, not its events); None where the file
    is missing or no readable profile."""
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            _check_member(path, zf, "header.json", MAX_HEADER_BYTES, os.fstat(f.fileno()).st_size)
            header = json.loads(zf.read("header.json"))
    except _UNREADABLE + (ProfileFormatError,):
        return None
    meta = header.get("meta") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def _read_checked(path: str) -> tuple[dict, np.ndarray, np.ndarray]:
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ProfileFormatError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise ProfileFormatError(f"{path}: empty file")
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        _check_member(path, zf, "header.json", MAX_HEADER_BYTES, st.st_size)
        header = json.loads(zf.read("header.json"))
        problem = _version_problem(header) or profile_schema.check_header(header)
        if problem is not None:
            raise ProfileFormatError(f"{path}: {problem}")
        for name in ("events.npy", "seq_records.npy"):
            _check_member(path, zf, name, MAX_ARRAY_BYTES, st.st_size)
        events = _read_array(path, zf, "events.npy", EVENT_DTYPE, header)
        seqs = _read_array(path, zf, "seq_records.npy", SEQ_DTYPE, header)
    problem = profile_schema.check_references(events, seqs, header)
    if problem is not None:
        raise ProfileFormatError(f"{path}: {problem}")
    return header, events, seqs


def _version_problem(header) -> str | None:
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        return "not a memprof profile"
    version = header.get("version")
    reads = f"this memprof reads versions {OLDEST_READ_VERSION} to {FORMAT_VERSION}"
    if type(version) is not int:   # "2" or 2.0 or true: not a version this writer wrote
        return f"profile format version {version!r} is not a version number ({reads})"
    if version > FORMAT_VERSION:
        return (f"written by a newer memprof (profile format version {version}); {reads}: "
                "upgrade memprof to read it")
    if version < OLDEST_READ_VERSION:
        return f"profile format version {version}, written by an older memprof; {reads}"
    return None


def _check_member(path: str, zf: zipfile.ZipFile, name: str, limit: int, file_size: int):
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise ProfileFormatError(f"{path}: not a memprof profile (no {name})") from None
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 1:
        raise ProfileFormatError(f"{path}: {name} is compressed or encrypted in a way memprof "
                                 "does not write")
    bound = info.compress_size if info.compress_type == zipfile.ZIP_STORED else \
        info.compress_size * _DEFLATE_RATIO + 1024
    if info.compress_size > file_size or info.file_size > min(limit, bound):
        raise ProfileFormatError(f"{path}: {name} declares {info.file_size} bytes from "
                                 f"{info.compress_size} stored, in a file of {file_size} "
                                 "bytes: damaged")


def _read_array(path: str, zf: zipfile.ZipFile, name: str, dtype: np.dtype,
                header: dict) -> np.ndarray:
    data = zf.read(name)
    if header["sha256"].get(name) != hashlib.sha256(data).hexdigest():
        raise ProfileFormatError(f"{path}: {name} is damaged (checksum mismatch)")
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    if version not in ((1, 0), (2, 0)):
        raise ProfileFormatError(f"{path}: {name}: unsupported .npy version {version}")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
        np.lib.format.read_array_header_2_0
    shape, _fortran, stored = read_header(buf)
    if stored != dtype:
        raise ProfileFormatError(f"{path}: event layout does not match this memprof")
    if len(shape) != 1 or shape[0] * dtype.itemsize != len(data) - buf.tell():
        raise ProfileFormatError(f"{path}: {name}: shape {shape} does not match its "
                                 f"{len(data) - buf.tell()} bytes of data")
    return np.frombuffer(data, dtype=dtype, count=shape[0], offset=buf.tell()).copy()


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


def recorded_steps(path: str) -> int:
    """The steps a saved profile marked, read from its header alone (0 for a file that is no
    readable profile, or of a run that ended before its first step): whether a file holds a
    training run worth keeping over a run that recorded nothing."""
    try:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read("header.json")).get("meta") or {}
        return int(meta.get("steps_marked") or 0)
    except Exception:  # noqa: BLE001  (not a profile, damaged, unreadable: nothing to keep)
        return 0
