"""A Profile as a Chrome / Perfetto trace (JSON object format of the Trace Event Format).

One process named after the run, with named threads:
  memory     counters: "memory" (one series per category: stacked in chrome://tracing, a
             track per category in Perfetto) and "live bytes" (their sum), downsampled so
             every peak is kept (report.series); the peak and CUDA OOM reports as instants
  steps      one slice per step of the steps table (args: peak, live at end, allocated); a
             partial last step or one cut by the event capacity says so, and how it ended
  phases     forward / backward / optimizer slices (never overlapping)
  findings   one instant per finding, at the step it names (else at the peak)
Timestamps are microseconds since tracking started.

Built from the profile's two event streams as they are (memory, side records): the single
interleaved stream (`profile.events`) is a fresh copy on every access, so it is not read here;
the time zero and the step spans, which read it, are computed once per trace.
"""
from __future__ import annotations

from ..finding import Finding
from ..profile import Profile
from ..record.events import CATEGORIES, KIND_OUT_OF_MEMORY
from .series import phase_spans, series, step_notes, step_spans, t0_ns

COUNTER_BUCKETS = 5_000
PID = 1
TID_MEMORY, TID_STEPS, TID_PHASES, TID_FINDINGS = 1, 2, 3, 4
THREADS = {TID_MEMORY: "memory", TID_STEPS: "steps", TID_PHASES: "phases",
           TID_FINDINGS: "findings"}


def _metadata(profile: Profile) -> list[dict]:
    what = profile.meta.get("model_class") or "run"
    events = [{"name": "process_name", "ph": "M", "pid": PID, "tid": 0,
               "args": {"name": f"memprof: {what} ({profile.device})"}},
              {"name": "process_sort_index", "ph": "M", "pid": PID, "tid": 0,
               "args": {"sort_index": 0}}]
    for tid, name in THREADS.items():
        events.append({"name": "thread_name", "ph": "M", "pid": PID, "tid": tid,
                       "args": {"name": name}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": tid,
                       "args": {"sort_index": tid}})
    return events


def _counters(profile: Profile) -> list[dict]:
    s = series(profile, COUNTER_BUCKETS)
    used = [k for k in range(len(CATEGORIES)) if s.by_category[:, k].any()]
    total = s.total
    out = []
    for row, t in enumerate(s.t_us.tolist()):
        ts = max(0, t)
        out.append({"name": "memory", "ph": "C", "pid": PID, "tid": TID_MEMORY, "ts": ts,
                    "args": {CATEGORIES[k]: int(s.by_category[row, k]) for k in used}})
        out.append({"name": "live bytes", "ph": "C", "pid": PID, "tid": TID_MEMORY, "ts": ts,
                    "args": {"bytes": int(total[row])}})
    return out


def _us(t0: int, t_ns: int) -> float:
    return max(0.0, (t_ns - t0) / 1e3)


def _slices(profile: Profile, t0: int, spans: list[tuple[int, int, int]]) -> list[dict]:
    out = []
    steps, notes = profile.steps, step_notes(profile)
    for start, end, i in spans:
        args = steps[i].as_dict() if i < len(steps) else {}
        args = {k: args[k] for k in ("peak", "live_at_end", "allocated") if k in args}
        name = f"step {i}"
        if i in notes:        # a partial step and how the run ended; a step cut by the capacity
            name += f" ({notes[i][0]})"
            args["ended"] = notes[i][1]
        out.append({"name": name, "cat": "step", "ph": "X", "pid": PID,
                    "tid": TID_STEPS, "ts": _us(t0, start),
                    "dur": (end - start) / 1e3, "args": args})
    for start, end, phase in phase_spans(profile):
        out.append({"name": phase, "cat": "phase", "ph": "X", "pid": PID,
                    "tid": TID_PHASES, "ts": _us(t0, start), "dur": (end - start) / 1e3})
    return out


def finding_step(f: Finding) -> int | None:
    """The step a finding is about, when its evidence names one."""
    ev = f.evidence or {}
    for key in ("first_step", "projected_step"):
        if isinstance(ev.get(key), int):
            return ev[key]
    for key in ("steps", "spike_steps"):
        v = ev.get(key)
        if isinstance(v, list) and v and isinstance(v[0], int):
            return v[0]
    return None


def _instants(profile: Profile, t0: int, spans: list[tuple[int, int, int]]) -> list[dict]:
    mem = profile.memory
    out = []
    peak_t = int(mem["t_ns"][profile.peak_index]) if profile.peak_index >= 0 else None
    if peak_t is not None:
        out.append({"name": "peak", "cat": "memory", "ph": "i", "s": "p", "pid": PID,
                    "tid": TID_MEMORY, "ts": _us(t0, peak_t), "args": profile.peak_event})
    ends = {i: end for _, end, i in spans}
    side = profile.run.streams.side   # markers and OOM reports, in order (not a copy)
    last = max([int(a["t_ns"][-1]) for a in (mem, side) if a.size], default=0)
    for f in profile.findings:
        step = finding_step(f)
        t = ends.get(step, peak_t if peak_t is not None else last)
        out.append({"name": f"{f.severity}: {f.kind}", "cat": "finding", "ph": "i", "s": "g",
                    "pid": PID, "tid": TID_FINDINGS, "ts": _us(t0, t),
                    "args": {"message": f.message, "holder": f.holder, "bytes": f.bytes,
                             "fix": f.fix, "step": step}})
    oom_t = side["t_ns"][side["kind"] == KIND_OUT_OF_MEMORY].tolist()   # as oom_events
    for oom, t in zip(profile.oom_events, oom_t):
        out.append({"name": "CUDA out of memory", "cat": "memory", "ph": "i", "s": "p",
                    "pid": PID, "tid": TID_MEMORY, "ts": _us(t0, int(t)), "args": oom})
    return out


def chrome_trace(profile: Profile) -> dict:
    t0, spans = t0_ns(profile), step_spans(profile)
    events = (_metadata(profile) + _counters(profile) + _slices(profile, t0, spans)
              + _instants(profile, t0, spans))
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"memprof": profile.summary()["meta"]}}
