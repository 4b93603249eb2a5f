"""The Chrome / Perfetto trace of a real run, checked against the Trace Event Format (JSON
object format): what each phase type requires, metadata names for every process and thread
used, slices that nest, counters that add up to the profile."""
import json
import numbers

import memprof
from memprof.record.events import CATEGORIES

# The Trace Event Format, as far as this exporter uses it: required keys and their types per
# phase ("ph"), and the values allowed where the format fixes them.
NUM, STR, INT = numbers.Real, str, int
SCHEMA = {
    "M": {"name": STR, "pid": INT, "tid": INT, "args": dict},
    "C": {"name": STR, "pid": INT, "ts": NUM, "args": dict},
    "X": {"name": STR, "pid": INT, "tid": INT, "ts": NUM, "dur": NUM},
    "i": {"name": STR, "pid": INT, "tid": INT, "ts": NUM, "s": STR},
}
METADATA_NAMES = {"process_name": "name", "thread_name": "name", "process_sort_index":
                  "sort_index", "thread_sort_index": "sort_index", "process_labels": "labels"}


def validate(trace: dict) -> list[str]:
    """Problems a trace viewer would warn about; [] for a clean trace."""
    problems = []
    if not isinstance(trace.get("traceEvents"), list):
        return ["traceEvents: expected a list"]
    if trace.get("displayTimeUnit", "ms") not in ("ms", "ns"):
        problems.append("displayTimeUnit must be 'ms' or 'ns'")
    for k, e in enumerate(trace["traceEvents"]):
        ph = e.get("ph")
        if ph not in SCHEMA:
            problems.append(f"event {k}: unsupported ph {ph!r}")
            continue
        for key, typ in SCHEMA[ph].items():
            if not isinstance(e.get(key), typ) or isinstance(e.get(key), bool):
                problems.append(f"event {k} ({ph} {e.get('name')}): {key} must be "
                                f"{typ.__name__}, got {e.get(key)!r}")
        if "ts" in e and e["ts"] < 0 or ph == "X" and e.get("dur", 0) < 0:
            problems.append(f"event {k}: negative time")
        if ph == "M":
            want = METADATA_NAMES.get(e["name"])
            if want is None or want not in e["args"]:
                problems.append(f"event {k}: metadata {e['name']!r} needs args.{want}")
        if ph == "C" and not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                 for v in e["args"].values()):
            problems.append(f"event {k}: counter args must be numbers")
        if ph == "i" and e["s"] not in ("g", "p", "t"):
            problems.append(f"event {k}: instant scope must be g, p or t")
    return problems + _nesting(trace["traceEvents"]) + _names(trace["traceEvents"])


def _nesting(events) -> list[str]:
    """Complete events on one thread must nest (or follow each other), never overlap."""
    problems, by_thread = [], {}
    for e in events:
        if e["ph"] == "X":
            by_thread.setdefault((e["pid"], e["tid"]), []).append(e)
    for key, xs in by_thread.items():
        xs.sort(key=lambda e: (e["ts"], -e["dur"]))
        open_ = []
        for e in xs:
            while open_ and open_[-1] <= e["ts"] + 1e-6:
                open_.pop()
            if open_ and e["ts"] + e["dur"] > open_[-1] + 1e-6:
                problems.append(f"thread {key}: {e['name']} at {e['ts']} overlaps its parent")
            open_.append(e["ts"] + e["dur"])
    return problems


def _names(events) -> list[str]:
    named_p = {e["pid"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    named_t = {(e["pid"], e["tid"]) for e in events
               if e["ph"] == "M" and e["name"] == "thread_name"}
    used_p = {e["pid"] for e in events}
    used_t = {(e["pid"], e["tid"]) for e in events if e["ph"] in "Xi"}
    return ([f"process {p} has no name" for p in used_p - named_p]
            + [f"thread {t} has no name" for t in used_t - named_t])


def _trace(profile, tmp_path):
    path = tmp_path / "t.json"
    memprof.export(profile, str(path))
    return json.loads(path.read_text())


def test_trace_is_valid_trace_event_format(leaky_profile, tmp_path):
    trace = _trace(leaky_profile, tmp_path)
    assert validate(trace) == []
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert names == {"memory", "steps", "phases", "findings"}


def test_validator_catches_what_viewers_warn_about():
    bad = {"traceEvents": [
        {"name": "a", "ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 10},
        {"name": "b", "ph": "X", "pid": 1, "tid": 1, "ts": 5, "dur": 10},
        {"name": "c", "ph": "i", "pid": 1, "tid": 1, "ts": 1, "s": "x"},
        {"name": "d", "ph": "C", "pid": 1, "ts": 1, "args": {"v": "1"}}]}
    problems = " | ".join(validate(bad))
    for what in ("overlaps", "instant scope", "counter args", "has no name"):
        assert what in problems


def test_counters_add_up_to_the_profile(leaky_profile, tmp_path):
    prof = leaky_profile
    events = _trace(prof, tmp_path)["traceEvents"]
    memory = [e for e in events if e["name"] == "memory" and e["ph"] == "C"]
    total = [e["args"]["bytes"] for e in events if e["name"] == "live bytes"]
    assert max(total) == prof.peak
    sums = [sum(e["args"].values()) for e in memory]
    assert sums == total
    at_peak = memory[sums.index(prof.peak)]["args"]
    assert at_peak == {k: v for k, v in prof.breakdown("category").items() if k in at_peak}
    assert set(at_peak) <= set(CATEGORIES)


def test_steps_phases_and_findings(leaky_profile, tmp_path):
    prof = leaky_profile
    events = _trace(prof, tmp_path)["traceEvents"]
    steps = [e for e in events if e.get("cat") == "step"]
    assert [e["name"] for e in steps] == [f"step {i}" for i in range(len(steps))]
    assert len(steps) == len(prof.markers("step"))
    assert steps[0]["args"]["peak"] == prof.steps[0].peak
    phases = [e["name"] for e in events if e.get("cat") == "phase"]
    assert phases[:3] == ["forward", "backward", "optimizer"]
    assert phases.count("forward") == len(prof.markers("forward_start"))
    found = [e for e in events if e.get("cat") == "finding"]
    assert len(found) == len(prof.findings) > 0
    leak = next(e for e in found if "retained_graph" in e["name"])
    assert leak["args"]["holder"] == "train.<locals>.kept" and leak["s"] == "g"
    # placed at the step the finding names
    step = leak["args"]["step"]
    assert leak["ts"] == steps[step]["ts"] + steps[step]["dur"]


def test_the_trace_rebuilds_the_interleaved_stream_at_most_once(leaky_profile, monkeypatch):
    """`profile.events` copies every event on each access; the trace does not read it (the
    step spans of report.series still do, once)."""
    from memprof.record.event_streams import EventStreams
    from memprof.report.trace import chrome_trace
    rebuilt = []
    merged = EventStreams.merged
    monkeypatch.setattr(EventStreams, "merged", lambda self: rebuilt.append(1) or merged(self))
    trace = chrome_trace(leaky_profile)
    assert len(rebuilt) <= 1
    assert validate(trace) == []


def test_oom_reports_and_unplaced_findings_keep_their_times():
    """Without memory events a finding that names no step sits at the last record, and each
    out-of-memory report at its own time: the same times the interleaved stream gives."""
    from memprof.finding import Finding
    from memprof.record.events import KIND_OUT_OF_MEMORY
    from memprof.report.trace import chrome_trace
    from analyse.runs import RunBuilder
    b = RunBuilder().mark("forward_start").mark("step")
    b._row(ptr=0, size=1 << 30, kind=KIND_OUT_OF_MEMORY)
    b.mark("forward_start")
    b._row(ptr=0, size=1 << 31, kind=KIND_OUT_OF_MEMORY)
    prof = b.profile()
    prof.findings.append(Finding("oom", "error", 1 << 31, "out of memory", "smaller batch"))
    events = prof.events
    t0 = int(events["t_ns"][0])
    oom_us = [(int(t) - t0) / 1e3 for t in events["t_ns"][events["kind"] == KIND_OUT_OF_MEMORY]]
    trace = chrome_trace(prof)["traceEvents"]
    assert [e["ts"] for e in trace if e["name"] == "CUDA out of memory"] == oom_us
    assert [e["args"]["requested"] for e in trace if e["name"] == "CUDA out of memory"] \
        == [1 << 30, 1 << 31]
    assert [e["ts"] for e in trace if e.get("cat") == "finding"] == \
        [(int(events["t_ns"][-1]) - t0) / 1e3]
