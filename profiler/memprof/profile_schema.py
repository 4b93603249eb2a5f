"""What the header of a profile file must hold, checked field by field before anything uses it.

`check_header(header)` and `check_references(...)` return None for a well-formed profile and
otherwise a short phrase saying what is wrong ("snapshots[3].category: expected an int in
[0, 6), got 9"); memprof.profile_file turns it into a ProfileFormatError naming the file. The
checks cover everything Profile, the analyses and the reports index with: a hand-edited or
hostile header is refused here instead of failing later as an IndexError in a report.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .finding import Finding
from .record.events import CATEGORIES, KIND_MARK, PHASES

_INT = "int"
_STR = "str"
_NUM = "number"


def _is(value, kind) -> bool:
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _STR:
        return isinstance(value, str)
    if kind == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _kind_name(kind) -> str:
    return kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))


def _got(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _list_of(value, kind, where: str) -> str | None:
    if not isinstance(value, list):
        return f"{where}: expected a list, got {_got(value)}"
    for i, item in enumerate(value):
        if not _is(item, kind):
            return f"{where}[{i}]: expected {_kind_name(kind)}, got {_got(item)}"
    return None


# top-level fields: (name, required, check(value, where) -> problem or None)
_META_TYPES = {"t0_ns": _INT, "dropped": _INT, "capacity": _INT, "threads": _INT,
               "steps_marked": _INT, "pid": _INT, "torch": _STR, "error": _STR,
               "step_on": _STR, "error_unix_s": _NUM}
_META_LISTS = ("patch_notes", "analysis_errors", "beside_modules")
# a distributed job's rank identity (record.distributed): what merging the ranks' files reads
_RANK_TYPES = {"rank": _INT, "world_size": _INT, "local_rank": _INT, "dist_backend": _STR,
               "run_id": _STR}
_RANK_OPTIONAL = ("local_rank", "dist_backend", "run_id")   # may be null where unknown
_FINDING_FIELDS = {"kind": _STR, "severity": _STR, "bytes": _INT, "message": _STR,
                   "fix": _STR, "holder": (str, type(None)), "evidence": dict}


#: memprof's own pauses just after a step boundary, [step, seconds] each, in the records: the
#: leak probe's looks, the live looks at the model and optimizers (record.live_look), the
#: looks at which parameters train (record.snapshots' look steps) and the autosaves (the
#: throughput tables take their time out of those steps)
PAUSES = (("leak_probe", "looks"), ("untrained_gradients", "looks"),
          ("parameters_without_gradients", "looks"), ("parameter_looks", "looks"),
          ("autosave", "saves"))


def check_header(header: Any) -> str | None:
    """None when the header's fields have the types the reader relies on."""
    if not isinstance(header, dict):
        return f"header: expected a JSON object, got {_got(header)}"
    for name, kind in (("strings", list), ("modules", list), ("snapshots", list),
                       ("meta", dict), ("step_seqs", list), ("records", dict),
                       ("findings", list), ("sha256", dict)):
        if name not in header:
            return f"header has no {name!r}"
        if not isinstance(header[name], kind):
            return f"{name}: expected a {kind.__name__}, got {_got(header[name])}"
    return (_list_of(header["strings"], _STR, "strings")
            or _list_of(header["modules"], _STR, "modules")
            or _list_of(header["step_seqs"], _INT, "step_seqs")
            or _check_meta(header["meta"])
            or _check_snapshot_fields(header["snapshots"])
            or _check_findings(header["findings"])
            or _check_records(header["records"]))


def _check_meta(meta: dict) -> str | None:
    for key, kind in _META_TYPES.items():
        if key in meta and not _is(meta[key], kind):
            return f"meta.{key}: expected {kind}, got {_got(meta[key])}"
    problem = _check_rank(meta)
    if problem:
        return problem
    partial = meta.get("partial")   # saved while the run went on (track_autosave)
    if partial is not None and not (isinstance(partial, dict)
                                    and _is(partial.get("steps_ended"), _INT)
                                    and _is(partial.get("elapsed_s", 0), _NUM)):
        return f"meta.partial: expected {{steps_ended: int, elapsed_s: number}}, got {_got(partial)}"
    if meta.get("model_class") is not None and not isinstance(meta["model_class"], str):
        return f"meta.model_class: expected str or null, got {_got(meta['model_class'])}"
    for key in _META_LISTS:
        if key in meta:
            problem = _list_of(meta[key], _STR, f"meta.{key}")
            if problem:
                return problem
    return None


def _check_rank(meta: dict) -> str | None:
    for key, kind in _RANK_TYPES.items():
        if key not in meta or (meta[key] is None and key in _RANK_OPTIONAL):
            continue
        if not _is(meta[key], kind):
            return f"meta.{key}: expected {kind}, got {_got(meta[key])}"
    if "rank" in meta or "world_size" in meta:
        rank, world = meta.get("rank"), meta.get("world_size")
        if rank is None or world is None:
            return "meta: rank and world_size go together; one of them is missing"
        if not 0 <= rank < world:
            return f"meta.rank: expected an int in [0, {world}) (world_size), got {rank}"
        local = meta.get("local_rank")
        if local is not None and not 0 <= local <= rank:
            return f"meta.local_rank: expected an int in [0, {rank}] (rank), got {local}"
    return None


def _check_snapshot_fields(snapshots: list) -> str | None:
    for i, s in enumerate(snapshots):
        where = f"snapshots[{i}]"
        if not isinstance(s, dict) or not {"marker", "category", "ptrs"} <= set(s) \
                or not set(s) <= {"marker", "category", "ptrs", "modules", "trainable"}:
            return (f"{where}: expected an object with marker, category, ptrs (and modules, "
                    "trainable)")
        if not _is(s["marker"], _INT):
            return f"{where}.marker: expected int, got {_got(s['marker'])}"
        if not _is(s["category"], _INT) or not 0 <= s["category"] < len(CATEGORIES):
            return (f"{where}.category: expected an int in [0, {len(CATEGORIES)}), got "
                    f"{_got(s['category'])}")
        problem = _list_of(s["ptrs"], _INT, f"{where}.ptrs")
        if problem or any(not 0 <= p < 1 << 64 for p in s["ptrs"]):
            return problem or f"{where}.ptrs: an address outside [0, 2**64)"
        modules = s.get("modules")
        if modules is not None:
            problem = _list_of(modules, _INT, f"{where}.modules")
            if problem or len(modules) != len(s["ptrs"]):
                return problem or f"{where}: {len(modules)} modules for {len(s['ptrs'])} ptrs"
        trainable = s.get("trainable")   # (absent in profiles saved before it was noted)
        if trainable is not None:
            problem = _list_of(trainable, _INT, f"{where}.trainable")
            if problem or len(trainable) != len(s["ptrs"]) or not set(trainable) <= {0, 1, 2}:
                return problem or (f"{where}.trainable: expected one 0, 1 or 2 per ptr "
                                   f"({len(s['ptrs'])}), got {len(trainable)} values: "
                                   f"{sorted(set(trainable))[:4]}")
    return None


def _check_findings(findings: list) -> str | None:
    for i, f in enumerate(findings):
        where = f"findings[{i}]"
        if not isinstance(f, dict) or set(f) != set(_FINDING_FIELDS):
            return f"{where}: expected an object with {', '.join(_FINDING_FIELDS)}"
        for key, kind in _FINDING_FIELDS.items():
            if not _is(f[key], kind):
                return f"{where}.{key}: expected {_kind_name(kind)}, got {_got(f[key])}"
    return None


def _check_records(records: dict) -> str | None:
    """Recorder records are plain JSON owned by their recorders; those read by every
    analysis are checked here: the logged numbers, the backward calls, the steps' optimizers
    and the steps a GradScaler skipped."""
    logs = records.get("logs", [])
    if not isinstance(logs, list):
        return f"records.logs: expected a list, got {_got(logs)}"
    for i, row in enumerate(logs):
        if not (isinstance(row, list) and len(row) == 3 and _is(row[0], _INT)
                and _is(row[1], _STR) and _is(row[2], _NUM)):
            return f"records.logs[{i}]: expected [step, name, value], got {_got(row)}"
    if not isinstance(records.get("backward", []), list):
        return f"records.backward: expected a list, got {_got(records['backward'])}"
    if not _is(records.get("first_step", 0), _INT) or records.get("first_step", 0) < 0:
        return "records.first_step: expected a step index (an integer >= 0)"
    for key, what in (("step_owners", "optimizer labels"), ("skipped_steps", "step indices")):
        values = records.get(key, [])
        if not isinstance(values, list) or not all(_is(v, _INT) for v in values):
            return f"records.{key}: expected a list of {what} (integers)"
    for name, key in PAUSES:
        rec = records.get(name) or {}
        rows = rec.get(key, []) if isinstance(rec, dict) else None
        if not isinstance(rows, list) or not all(
                isinstance(r, list) and len(r) == 2 and _is(r[0], _INT) and _is(r[1], _NUM)
                for r in rows):
            return f"records.{name}.{key}: expected a list of [step, seconds]"
    return None


def check_references(events: np.ndarray, seq_records: np.ndarray, header: dict) -> str | None:
    """None when every index in the arrays and snapshots points at something that exists."""
    n_strings, n_modules = len(header["strings"]), len(header["modules"])
    marks = events["op"][events["kind"] == KIND_MARK]
    if marks.size and (marks.min() < 0 or marks.max() >= n_strings):
        return f"events: a marker names a string outside the {n_strings} strings"
    phase = events["phase"]
    if phase.size and (phase.min() < 0 or phase.max() >= len(PHASES)):
        return f"events: a phase outside [0, {len(PHASES)})"
    for name, arr in (("events", events), ("seq_records", seq_records)):
        module = arr["module"]
        if module.size and (module.min() < -1 or module.max() >= n_modules):
            return f"{name}: a module id outside the {n_modules} modules"
    for i, s in enumerate(header["snapshots"]):
        if not 0 <= s["marker"] <= len(events):   # == len: blocks from before tracking
            return f"snapshots[{i}].marker {s['marker']}: outside the {len(events)} events"
        if any(not -1 <= m < n_modules for m in s.get("modules") or ()):
            return f"snapshots[{i}].modules: a module id outside the {n_modules} modules"
    lists = header["records"].get("parametrizations", [])
    if not isinstance(lists, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(_is(m, _INT) and 0 <= m < n_modules
                                                        for m in r) for r in lists):
        return (f"records.parametrizations: expected [list id, module id] pairs of module "
                f"ids inside the {n_modules} modules")
    return None


def findings_of(header: dict) -> list[Finding]:
    return [Finding(**f) for f in header["findings"]]
