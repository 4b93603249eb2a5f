"""Retained autograd graphs: which tensors keep an earlier step's graph alive, how many bytes
that pins, and which Python reference holds them (`model.blocks[3].attn.history[11]`,
`train.<locals>.running_loss`, `metrics['out']`).

How a retained graph is told apart from a healthy one: every autograd node carries the
sequence number of the forward op that created it, and memprof records the sequence counter
at every step boundary. A tensor whose graph reaches nodes of a step *before* the latest one
survived a backward and an optimizer step: in a correct loop nothing does.
"""
from __future__ import annotations

import bisect
import collections
import gc
import sys
import time
import types
import weakref
from dataclasses import dataclass, field

import torch

from . import _C
from .events import PHASE_BACKWARD, PHASE_OTHER
from .profile import Finding, Profile

MAX_GRAPH_NODES = 200_000       # per analysis, over all graphs (shared visited set)
MAX_HOLDER_OBJECTS = 200_000    # objects visited while searching for holders
MAX_HOLDER_DEPTH = 8
ACCUMULATE_GRAD_SEQ = 1 << 62   # AccumulateGrad nodes have UINT64_MAX as sequence number

_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()).keys())
_ATOMS = (str, bytes, int, float, complex, bool, type(None), types.FunctionType,
          types.BuiltinFunctionType, types.MethodType, types.ModuleType, type, range, slice,
          torch.dtype, torch.device, torch.Size)


@dataclass
class GraphTensor:
    """A live tensor with autograd history, and what its graph pins."""
    tensor_id: int
    min_seq: int
    max_seq: int
    nbytes: int
    storage: int
    numel: int
    grad_fn: str
    nodes: int = 0
    saved: dict = field(default_factory=dict)   # storage ptr -> nbytes, still unreleased


def _storage(t: torch.Tensor) -> tuple[int, int]:
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except Exception:  # noqa: BLE001
        return 0, 0


_saved_names_cache: dict[type, tuple[str, ...]] = {}


def _saved_attr_names(node) -> tuple[str, ...]:
    cls = type(node)
    names = _saved_names_cache.get(cls)
    if names is None:
        names = tuple(n for n in dir(node) if n.startswith("_saved_"))
        _saved_names_cache[cls] = names
    return names


def _saved_tensors(node):
    """Tensors a node still holds for backward (nothing once backward released them)."""
    for name in _saved_attr_names(node):
        try:
            val = getattr(node, name)
        except RuntimeError:  # released by backward (the normal case after a step)
            return
        except Exception:  # noqa: BLE001
            continue
        if isinstance(val, torch.Tensor):
            yield val
        elif isinstance(val, (tuple, list)):
            for v in val:
                if isinstance(v, torch.Tensor):
                    yield v


def live_graph_tensors() -> list[torch.Tensor]:
    """Every Python-visible real tensor that has autograd history (fake tensors belong to
    memprof.estimate's steps, not to the run being checked)."""
    from torch._subclasses.fake_tensor import FakeTensor
    out = []
    tensor_type = torch.Tensor
    for obj in gc.get_objects():
        # issubclass(type(...)) rather than isinstance: never triggers a lazy __class__
        cls = type(obj)
        if issubclass(cls, tensor_type) and not issubclass(cls, FakeTensor):
            try:
                if obj.grad_fn is not None:
                    out.append(obj)
            except Exception:  # noqa: BLE001
                continue
    return out


def walk_graphs(tensors: list[torch.Tensor], exclude_storages: set[int]
                ) -> tuple[list[GraphTensor], bool]:
    """Sequence range, node count and unreleased saved tensors of each tensor's graph, and
    whether the node budget ran out (then later graphs were only partly walked)."""
    visited: dict[int, tuple[int, int, int, dict]] = {}
    budget = MAX_GRAPH_NODES
    results = []
    for t in tensors:
        root = t.grad_fn
        lo, hi, count, saved = sys.maxsize, -1, 0, {}
        stack = [root]
        seen_here = set()
        while stack and budget > 0:
            node = stack.pop()
            if node is None or id(node) in seen_here:
                continue
            seen_here.add(id(node))
            cached = visited.get(id(node))
            if cached is not None and id(node) != id(root):
                c_lo, c_hi, c_count, c_saved = cached
                lo, hi = min(lo, c_lo), max(hi, c_hi)
                count += c_count
                saved.update(c_saved)
                continue
            budget -= 1
            count += 1
            try:
                seq = node._sequence_nr()
            except Exception:  # noqa: BLE001
                seq = -1
            if 0 <= seq < ACCUMULATE_GRAD_SEQ:
                lo, hi = min(lo, seq), max(hi, seq)
            for s in _saved_tensors(node):
                ptr, nb = _storage(s)
                if ptr and ptr not in exclude_storages:
                    saved[ptr] = nb
            for nxt, _ in getattr(node, "next_functions", ()):
                if nxt is not None:
                    stack.append(nxt)
        visited[id(root)] = (lo, hi, count, saved)
        ptr, nb = _storage(t)
        results.append(GraphTensor(id(t), lo if hi >= 0 else -1, hi, nb, ptr, t.numel(),
                                   type(root).__name__, count, saved))
    return results, budget <= 0


# ------------------------------------------------------------------------------- holders
def _children(obj, path: str):
    """(path, child) pairs of the containers a holder search goes through."""
    if isinstance(obj, torch.nn.Module):
        for name, child in obj._modules.items():
            if child is not None:
                yield f"{path}.{name}", child
        for name, val in vars(obj).items():
            if name not in _MODULE_INTERNALS:
                yield f"{path}.{name}", val
    elif isinstance(obj, (list, tuple, collections.deque)):
        for i, v in enumerate(obj):
            yield f"{path}[{i}]", v
    elif isinstance(obj, dict):
        for k, v in obj.items():
            key = repr(k) if isinstance(k, (str, int, float, tuple)) else f"<{type(k).__name__}>"
            yield f"{path}[{key}]", v
    elif isinstance(obj, (set, frozenset)):
        for v in obj:
            yield f"{path}{{...}}", v
    elif hasattr(obj, "__dict__") and not isinstance(obj, _ATOMS):
        try:
            items = list(vars(obj).items())
        except TypeError:
            return
        for name, val in items:
            yield f"{path}.{name}", val


def find_holders(roots: list[tuple[str, object]], targets: set[int]) -> dict[int, str]:
    """Breadth-first search from named roots to the target tensors: id -> shortest path."""
    found: dict[int, str] = {}
    seen: set[int] = set()
    queue = collections.deque((p, o, 0) for p, o in roots)
    visited = 0
    while queue and visited < MAX_HOLDER_OBJECTS and len(found) < len(targets):
        path, obj, depth = queue.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        visited += 1
        if isinstance(obj, torch.Tensor):
            if id(obj) in targets and id(obj) not in found:
                found[id(obj)] = path
            continue
        if isinstance(obj, _ATOMS) or depth >= MAX_HOLDER_DEPTH:
            continue
        for child_path, child in _children(obj, path):
            if id(child) not in seen and not isinstance(child, _ATOMS):
                queue.append((child_path, child, depth + 1))
    return found


def describe_unreached(t: torch.Tensor) -> str:
    """One hop through the garbage collector for a tensor no named root reaches."""
    refs = [r for r in gc.get_referrers(t) if not isinstance(r, types.FrameType)]
    kinds = sorted({type(r).__name__ for r in refs})
    return f"a {', '.join(kinds) or 'C++ object'} not reachable from the model or the tracked frame"


def frame_roots(frame) -> list[tuple[str, object]]:
    """Named roots from the frame that ran the `with memprof.track()` block."""
    if frame is None:
        return []
    code = frame.f_code
    scope = "" if code.co_name == "<module>" else f"{code.co_name}.<locals>."
    roots = [(f"{scope}{k}", v) for k, v in frame.f_locals.items()]
    if scope:
        mod = frame.f_globals.get("__name__", "globals")
        roots += [(f"{mod}.{k}", v) for k, v in frame.f_globals.items()
                  if not k.startswith("__") and not isinstance(v, _ATOMS)]
    return roots


def _container(path: str) -> str:
    """'maps[3][11]' -> 'maps' (tensors in one container form one finding)."""
    while path.endswith("]") and "[" in path:
        path = path[:path.rindex("[")]
    return path


def _fix_for(path: str, numel: int, grad_fn: str) -> str:
    if numel == 1 and ("Add" in grad_fn or "Sum" in grad_fn or "Mean" in grad_fn
                       or "Div" in grad_fn):
        return ("accumulate a number, not the graph: `running += loss.item()` "
                "(or `loss.detach()`)")
    if path.endswith("]"):
        return ("store `t.detach()` (or `.item()` for scalars) instead of `t`, and clear the "
                "container when the step is done")
    return ("detach state carried across steps (`h = h.detach()`), or drop the reference "
            "after backward")


UNUSED_GRAPH_MIN_BYTES = 1024


def retained_graphs(profile: Profile, tracker) -> list[Finding]:
    """Two ways a live tensor's graph wastes memory, grouped by the Python reference holding it:

    retained_graph  its graph reaches nodes of a step before the last one: it survived a
                    backward and an optimizer step (a leak that grows).
    unused_graph    its graph was built in the last completed step, backward never ran
                    through it, and it still pins saved tensors: they stayed alive through
                    backward and the optimizer step (a higher peak every step).
    """
    boundaries = getattr(tracker, "_step_seqs", None)
    if not boundaries or len(boundaries) < 2:
        return []  # needs at least one step boundary to tell steps apart
    t0 = time.perf_counter()
    # Node sequence numbers at or after boundaries[i] were created in step i or later; the
    # last completed step may legitimately still be referenced (its loss, its outputs).
    last_step = len(boundaries) - 2
    tensors = live_graph_tensors()
    exclude = {_storage(p)[0] for p in tracker._all_params()}
    graphs, truncated = walk_graphs(tensors, exclude)
    if truncated:
        profile.meta.setdefault("analysis_errors", []).append(
            f"retained_graphs checked only the first {MAX_GRAPH_NODES} autograd nodes: leaks "
            "in graphs beyond them may be missed")
    by_id = {id(t): t for t in tensors}
    # graphs that began before tracking started are not this run's to judge
    mine = [g for g in graphs if g.min_seq >= boundaries[0]]
    old = [g for g in mine if bisect.bisect_right(boundaries, g.min_seq) - 1 < last_step]
    unused = [g for g in mine if g.min_seq >= boundaries[last_step]
              and g.max_seq < boundaries[-1]
              and sum(b for p, b in g.saved.items() if p != g.storage) >= UNUSED_GRAPH_MIN_BYTES]
    findings: list[Finding] = []
    if old or unused:
        roots = []
        if tracker.model is not None:
            roots.append(("model", tracker.model))
        roots += frame_roots(tracker._frame)
        for prefix, namespace in getattr(tracker, "roots", []):
            roots += [(f"{prefix}{k}", v) for k, v in namespace.items()
                      if not k.startswith("__") and not isinstance(v, _ATOMS)]
        if tracker.optimizer is not None:
            roots.append(("optimizer", tracker.optimizer))
        holders = find_holders(roots, {g.tensor_id for g in old + unused})
        alive = _alive_allocations(profile)
        for kind, gs in (("retained_graph", old), ("unused_graph", unused)):
            for names, group in _group_by_holder(gs, holders, by_id):
                findings.append(_finding(kind, names, group, holders, boundaries, profile,
                                         alive))
    findings.sort(key=lambda f: (f.kind != "retained_graph", -f.bytes))
    profile.meta["retained_graph_check_s"] = time.perf_counter() - t0
    return findings


def _group_by_holder(gs, holders, by_id) -> list[tuple[list[str], list[GraphTensor]]]:
    groups: dict[str, list[GraphTensor]] = collections.defaultdict(list)
    unreached: list[GraphTensor] = []
    for g in gs:
        path = holders.get(g.tensor_id)
        if path:
            groups[_container(path)].append(g)
        else:
            unreached.append(g)
    # Holders that pin the same graph (h and the output computed from it) are one finding.
    merged: list[tuple[list[str], list[GraphTensor]]] = []
    for holder, group in sorted(groups.items()):
        other = _overlapping(merged, group)
        if other is not None:
            other[0].append(holder)
            other[1].extend(group)
        else:
            merged.append(([holder], list(group)))
    # Tensors no named root reaches are usually interior nodes of a graph some holder keeps
    # (PyTorch keeps their Python objects alive from C++): fold them into that finding.
    for g in unreached:
        other = _overlapping(merged, [g])
        if other is not None:
            other[1].append(g)
        else:
            merged.append(([describe_unreached(by_id[g.tensor_id])], [g]))
    return merged


def _overlapping(merged, group):
    saved = set().union(*(g.saved for g in group)) | {g.storage for g in group}
    for entry in merged:
        other_saved = set().union(*(g.saved for g in entry[1]))
        other_all = other_saved | {g.storage for g in entry[1]}
        if saved and other_all and len(saved & other_all) >= 0.5 * min(len(saved),
                                                                        len(other_all)):
            return entry
    return None


def _finding(kind, names, gs, holders, boundaries, profile, alive) -> Finding:
    holder = " and ".join(names)
    storages: dict[int, int] = {}
    for g in gs:
        storages[g.storage] = g.nbytes
        storages.update(g.saved)
    storages.pop(0, None)
    nbytes = sum(storages.values())
    steps = sorted({bisect.bisect_right(boundaries, g.min_seq) - 1 for g in gs})
    origin = _origin(profile, alive, [g.storage for g in gs])
    example = holders.get(gs[0].tensor_id, names[0])
    n = len(gs)
    nodes = sum(g.nodes for g in gs)
    saved_bytes = sum({p: b for g in gs for p, b in g.saved.items()}.values())
    tensor_bytes = sum({g.storage: g.nbytes for g in gs}.values())
    evidence = {"tensors": n, "example_path": example, "steps": steps,
                "first_sequence_nr": int(min(g.min_seq for g in gs)),
                "saved_bytes": int(saved_bytes), "tensor_bytes": int(tensor_bytes)}
    what = f"{n} tensor{'s' if n > 1 else ''} (grad_fn {gs[0].grad_fn}, {nodes} graph nodes)"
    made = f"; created by {origin}" if origin else ""
    if kind == "retained_graph":
        span = f"{steps[0]}" + (f"-{steps[-1]}" if len(steps) > 1 else "")
        return Finding(
            kind=kind, severity="error", bytes=int(nbytes), holder=holder, evidence=evidence,
            message=f"{what} with autograd history from step {span} still alive after later "
                    f"steps' backward, pinning {_fmt(nbytes)}{made}",
            fix=_fix_for(example, gs[0].numel, gs[0].grad_fn))
    return Finding(
        kind=kind, severity="warning", bytes=int(saved_bytes), holder=holder,
        evidence=evidence,
        message=f"{what} built in step {steps[-1]} that backward never used: its graph kept "
                f"{_fmt(saved_bytes)} of saved tensors alive through backward and the optimizer "
                f"step{made}",
        fix="compute it under torch.no_grad() or from .detach()ed inputs (e.g. keep "
            "attention maps with .detach() before deriving rollouts or metrics from them)")


def _alive_allocations(profile: Profile) -> dict[int, int]:
    """ptr -> memory position of the allocation alive at the end."""
    alive = profile.alive_at("end")
    return {int(p): int(i) for p, i in zip(profile.memory["ptr"][alive], alive)}


def _origin(profile: Profile, alive: dict[int, int], ptrs: list[int]) -> str:
    """'aten::softmax in blocks.3.attn (forward, step 2)' for the largest of the storages."""
    best = None
    for p in ptrs:
        i = alive.get(int(p))
        if i is not None and (best is None or profile.memory["size"][i] >
                              profile.memory["size"][best]):
            best = i
    if best is None:
        return ""
    d = profile.describe_event(best)
    return f"{d['op']} in {d['module']} ({d['phase']})"


def _fmt(n: int) -> str:
    from .report.terminal import fmt_bytes
    return fmt_bytes(n)


# ------------------------------------------------------------------------------- backward use
class BackwardRecorder:
    """The one wrapper of torch.autograd.backward while tracking: records retain_graph and
    repeated roots, ends the backward phase, and runs the callbacks other recorders add:
    `before` callbacks get (tensors, grad_tensors) (health's loss and gradient checks), `after`
    callbacks nothing (throughput's backward_end marker)."""

    def __init__(self, tracker):
        self._tracker = weakref.ref(tracker)  # the tracker owns us: no reference cycle
        self.calls: list[dict] = []
        self.before: list = []
        self.after: list = []
        self._original = None

    def install(self):
        self._original = torch.autograd.backward
        original = self._original
        recorder = self

        def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False,
                     *args, **kwargs):
            try:
                roots = tensors if isinstance(tensors, (list, tuple)) else [tensors]
                # a node's sequence number identifies it for the whole run (ids get reused)
                recorder.calls.append({
                    "roots": [t.grad_fn._sequence_nr() for t in roots
                              if isinstance(t, torch.Tensor) and t.grad_fn is not None],
                    "retain_graph": bool(retain_graph if retain_graph is not None
                                         else create_graph),
                    "step": getattr(recorder._tracker(), "_step", -1)})
            except Exception:  # noqa: BLE001  (recording must never break backward)
                pass
            for fn in recorder.before:
                fn(tensors, grad_tensors)
            out = original(tensors, grad_tensors, retain_graph, create_graph, *args, **kwargs)
            # backward is over: what runs next (logging, the next micro-step's data) is not
            if _C.get_phase() == PHASE_BACKWARD:
                _C.set_phase(PHASE_OTHER)
            for fn in recorder.after:
                fn()
            return out

        torch.autograd.backward = backward

    def detach(self, before=None, after=None) -> None:
        """Take a recorder's callbacks out again (each is there at most once)."""
        for fns, fn in ((self.before, before), (self.after, after)):
            if fn is not None and fn in fns:
                fns.remove(fn)

    def remove(self):
        if self._original is not None:
            torch.autograd.backward = self._original
            self._original = None


def remove_handles(handles: list) -> None:
    """Remove hook handles; one that fails (its module is gone) does not stop the rest."""
    for h in handles:
        try:
            h.remove()
        except Exception:  # noqa: BLE001
            pass
    handles.clear()


def backward_misuse(profile: Profile, tracker) -> list[Finding]:
    calls = getattr(tracker, "_backward", None)
    calls = calls.calls if calls is not None else []
    findings = []
    uses = collections.Counter(r for c in calls for r in c["roots"])
    twice = [c for c in calls if any(uses[r] > 1 for r in c["roots"])]
    if twice:
        steps = sorted({c["step"] for c in twice})
        findings.append(Finding(
            kind="backward_twice", severity="info", bytes=0,
            message=f"backward ran more than once through the same graph (steps {steps[:5]}): "
                    "its saved tensors stay pinned until the last call",
            fix="sum the losses and call backward once, or drop retain_graph after the last use",
            evidence={"calls": len(twice)}))
    retained = [c for c in calls if c["retain_graph"]]
    if retained:
        steps = sorted({c["step"] for c in retained})
        findings.append(Finding(
            kind="retain_graph", severity="info", bytes=0,
            message=f"backward(retain_graph=True) in {len(retained)} call(s) (steps "
                    f"{steps[:5]}): each such graph keeps all its saved tensors until the last "
                    "reference to it is dropped",
            fix="drop retain_graph=True unless a second backward needs the same graph; if it "
                "was added to silence 'backward through the graph a second time', detach the "
                "state carried across steps instead",
            evidence={"calls": len(retained)}))
    return findings
