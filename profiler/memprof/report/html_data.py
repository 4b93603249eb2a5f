"""The numbers behind the HTML report, computed from a Profile: the timeline the page's script
plots (compact columns), the module tree at the peak with bytes by category, the largest
allocations alive at the peak and one row per step (memory, time split, health)."""
from __future__ import annotations

import numpy as np

from ..analyse import health as _health
from ..analyse import throughput as _throughput
from ..profile import OUTSIDE_MODULES, Profile
from ..record.events import CATEGORIES, PHASES
from .series import Series, phase_spans, series, step_notes, step_spans, t0_ns

JS_BUCKETS = 6_000       # timeline points for zoom: about 2 per bucket
DETAIL_EVENTS = 1_500    # every event this close to the peak, for zooming into it
PHASE_CODES = {"forward": 0, "backward": 1, "optimizer": 2}


def delta(values) -> list[int]:
    """[v0, v1 - v0, v2 - v1, ...]: small numbers for JSON (the page sums them back)."""
    a = np.asarray(values, dtype=np.int64)
    return np.diff(a, prepend=0).tolist() if a.size else []


def undelta(values) -> np.ndarray:
    return np.cumsum(np.asarray(values, dtype=np.int64))


class _Table:
    """Strings of one column (ops, modules), numbered in order of first use."""

    def __init__(self):
        self.names: list[str] = []
        self.ids: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        if name not in self.ids:
            self.ids[name] = len(self.names)
            self.names.append(name)
        return self.ids[name]


def _points(profile: Profile, s: Series, ops: _Table, modules: _Table) -> dict:
    mem = profile.memory
    idx = s.index
    op_ids = mem["op"][idx]
    mod_ids = profile.event_module[idx]
    op_names = {int(o): ops(profile._name(int(o), "<no op>")) for o in np.unique(op_ids)}
    mod_names = {int(m): modules(profile.module_name(int(m))) for m in np.unique(mod_ids)}
    return {"t": delta(s.t_us), "c": [delta(s.by_category[:, k]) for k in range(len(CATEGORIES))],
            "step": delta(mem["step"][idx]), "phase": mem["phase"][idx].astype(int).tolist(),
            "op": [op_names[int(o)] for o in op_ids], "module": [mod_names[int(m)] for m in mod_ids],
            "event": delta(idx)}


def peak_window(n: int, peak: int) -> tuple[int, int]:
    """The events [lo, hi) that "zoom to peak" shows: those around the peak, at most a
    twentieth of the run (a window of the whole run zoomed to nothing) and at most the
    events kept in full near the peak (`detail`)."""
    half = max(1, min(DETAIL_EVENTS // 2, n // 20))
    return max(0, peak - half), min(n, peak + half)


def timeline_data(profile: Profile) -> dict:
    """Everything the page's script needs to redraw the timeline at any zoom."""
    ops, modules = _Table(), _Table()
    coarse = series(profile, JS_BUCKETS)
    out = {"categories": list(CATEGORIES), "phases": list(PHASES),
           "points": _points(profile, coarse, ops, modules), "detail": None,
           "peak": {"bytes": profile.peak, "index": profile.peak_index}}
    n, p = profile.memory.size, profile.peak_index
    if p >= 0 and n > coarse.index.size:
        lo, hi = max(0, p - DETAIL_EVENTS // 2), min(n, p + DETAIL_EVENTS // 2)
        detail = series(profile, idx=np.arange(lo, hi))
        out["detail"] = _points(profile, detail, ops, modules)
    t0 = t0_ns(profile)
    ev_t = profile.events["t_ns"]
    out["t_end"] = int((int(ev_t[-1]) - t0) // 1000) if ev_t.size else 0
    if p >= 0:
        t_ns = profile.memory["t_ns"]
        out["peak"]["t"] = int((int(t_ns[p]) - t0) // 1000)
        lo, hi = peak_window(n, p)
        out["peak_window"] = [int((int(t_ns[lo]) - t0) // 1000),
                              int((int(t_ns[hi - 1]) - t0) // 1000)]
    out["steps"] = [[(a - t0) // 1000, (b - t0) // 1000, i] for a, b, i in step_spans(profile)]
    out["step_notes"] = {str(i): label for i, (label, _) in step_notes(profile).items()}
    out["spans"] = [[(a - t0) // 1000, (b - t0) // 1000, PHASE_CODES[ph]]
                    for a, b, ph in phase_spans(profile)]
    out["span_names"] = list(PHASE_CODES)
    out["ops"], out["modules"] = ops.names, modules.names
    return out


# ------------------------------------------------------------------ at the peak
def module_nodes(profile: Profile) -> list[dict]:
    """The module tree alive at the peak as icicle nodes (root first): a root for all memory,
    the model's modules below it, models kept beside it (an EMA copy) and memory outside every
    module beside the model."""
    alive = profile.alive_at("peak")
    k = len(CATEGORIES)
    mods = profile.event_module[alive].astype(np.int64)
    n_mod = len(profile.modules)
    mods = np.where((mods >= 0) & (mods < n_mod), mods, n_mod)       # n_mod: outside
    flat = mods * k + profile.category[alive].astype(np.int64)
    sums = np.bincount(flat, weights=profile.memory["size"][alive].astype(np.float64),
                       minlength=(n_mod + 1) * k)
    self_bytes = np.rint(sums).astype(np.int64).reshape(n_mod + 1, k)
    names = list(profile.modules) + [OUTSIDE_MODULES]
    nodes = [{"name": "all memory at the peak", "label": "all memory at the peak", "depth": 0,
              "self": 0, "cat": np.zeros(k, dtype=np.int64), "children": []}]
    index = {}
    for mid, name in enumerate(names):
        if name in index:   # one node per name (ids that share one: older profiles' calls)
            node = nodes[index[name]]
            node["self"] += int(self_bytes[mid].sum())
            node["cat"] = node["cat"] + self_bytes[mid]
            continue
        index[name] = len(nodes)
        label = profile.module_name(mid) if mid < n_mod and name == "" else _label(name)
        nodes.append({"name": profile.module_name(mid) if mid < n_mod else name,
                      "label": label, "depth": 0, "self": int(self_bytes[mid].sum()),
                      "cat": self_bytes[mid].copy(), "children": []})
    beside = set(profile.meta.get("beside_modules") or ())   # (an EMA beside: no child)
    for name, i in index.items():
        parent = 0 if i == index[OUTSIDE_MODULES] or name == "" or name in beside else \
            index.get(name.rsplit(".", 1)[0] if "." in name else "", 0)
        nodes[parent]["children"].append(i)
    _fill_totals(nodes, 0, 0)
    for n in nodes:
        n["by_category"] = {c: int(n["cat"][j]) for j, c in enumerate(CATEGORIES)}
        n["children"].sort(key=lambda c: -nodes[c]["total"])
    return nodes


def _label(name: str) -> str:
    """The last part of a qualified name; with its parent's when it is an index ('blocks.3')."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _fill_totals(nodes: list[dict], i: int, depth: int) -> None:
    order, stack = [], [(i, depth)]
    while stack:                      # iterative: module trees can be deep
        j, d = stack.pop()
        nodes[j]["depth"] = d
        order.append(j)
        stack.extend((c, d + 1) for c in nodes[j]["children"])
    for j in reversed(order):
        for c in nodes[j]["children"]:
            nodes[j]["cat"] = nodes[j]["cat"] + nodes[c]["cat"]
        nodes[j]["total"] = int(nodes[j]["cat"].sum())


def top_allocations(profile: Profile, n: int = 15) -> list[dict]:
    """The largest allocations alive at the peak, described."""
    alive = profile.alive_at("peak")
    sizes = profile.memory["size"][alive]
    top = alive[np.argsort(-sizes, kind="stable")[:n]]
    rows = []
    for i in top.tolist():
        d = profile.describe_event(i)
        d["category"] = CATEGORIES[int(profile.category[i])]
        rows.append(d)
    return rows


# ------------------------------------------------------------------ per step
STEP_TIME = ("data_ms", "forward_ms", "eval_ms", "backward_ms", "optimizer_ms", "other_ms")


MAX_STEP_ROWS = 200


def shown_steps(rows: list[dict], limit: int = MAX_STEP_ROWS) -> list[dict]:
    """All rows, or for a long run the first and last 20 and the highest peaks between,
    in step order."""
    if len(rows) <= limit:
        return rows
    ends = rows[:20] + rows[-20:]
    middle = sorted(rows[20:-20], key=lambda r: -r["peak"])[:limit - len(ends)]
    return sorted(ends + middle, key=lambda r: r["step"])


def step_rows(profile: Profile) -> tuple[list[dict], bool]:
    """(per step: memory, time split (ms), samples/s and, with health=True, loss, grad norm
    before / after clipping and LR; whether a DataLoader was iterated - the time before the
    forward is a data wait only then)."""
    tp = _throughput.summarize(profile) if "throughput" in profile.run.records else None
    hl = _health.summarize(profile)
    per = (tp or {}).get("per_step") or {}
    hs = (hl or {}).get("per_step") or {}
    by_step = {s: k for k, s in enumerate(hs.get("step", []))}
    rows = []
    for s in profile.steps:
        row = {"step": s.index, "peak": s.peak, "live_at_end": s.live_at_end,
               "allocated": s.allocated}
        if s.index < len(per.get("wall_ms", [])):
            for key in ("wall_ms",) + STEP_TIME + ("samples", "samples_per_s"):
                row[key] = per[key][s.index]   # (samples/s: the step's round's, analyse.turns)
        k = by_step.get(s.index)
        if k is not None:
            for key in ("loss", "grad_norm", "grad_norm_pre_clip", "lr"):
                row[key] = hs[key][k]
        rows.append(row)
    return rows, bool((tp or {}).get("data_loader_seen"))
