"""Retained autograd graphs: which tensors keep an earlier step's graph alive, how many bytes
that pins, and which Python reference holds them (`model.blocks[3].attn.history[11]`,
`train.<locals>.running_loss`, `metrics['out']`).

How a retained graph is told apart from a healthy one: every autograd node carries the
sequence number of the forward op that created it, and memprof records the sequence counter
at every step boundary. A tensor whose graph reaches nodes of a step *before* the latest one
survived a backward and an optimizer step: in a correct loop nothing does. With several
optimizers stepping in turn (a GAN) the last iteration is one step of each.

Findings are grouped by root holder (`history`, not one per `history[0]['cache'][k]`), list
the paths inside, count each pinned storage once, and carry a fix chosen from what holds the
graph (leak_fixes). tests/corpus holds these rules to correct and buggy loops.
"""
from __future__ import annotations

import bisect
import collections
import gc
import re
import time
import weakref

from .. import _C
from ..finding import Finding
from ..profile import Profile
from ..units import fmt_bytes
from ..record.autograd_graphs import (MAX_GRAPH_NODES, GraphTensor, live_graph_tensors,
                                      storage_of, walk_graphs)
from .leak_fixes import fix_text
from .turns import last_round_start
from .outcome import Outcome
from ..record.session import active_session
from ..record.leak_probe import held_until_the_call_returns
from ..record.recomputed_weights import recomputed_weights
from ..record.holders import (describe_unreached, find_holders, frame_roots, model_roots,
                               namespaces_roots)


def root_holder(path: str) -> str:
    """The reference a user would change: 'history[0]['cache'][3]' -> 'history',
    'model.blocks.3.attn.maps[11]' -> 'model.blocks.3.attn.maps', a closure's captured
    variable -> the container of the closure; a module hook's captured variable ->
    'model.0._forward_hooks[4].<closure store>' (the hook is what the user wrote)."""
    hook = _HOOK_CLOSURE.search(path)
    if hook:
        return path[:hook.end()]
    cut = [i for i in (path.find("["), path.find(".<closure")) if i > 0]
    return path[:min(cut)] if cut else path


def _in_number_order(path: str) -> list:
    """'losses[2]' before 'losses[10]': indices compared as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


_HOOK_CLOSURE = re.compile(r"\._(?:forward|backward)(?:_pre)?_hooks\[[^\]]*\]\.<closure [^>]*>")


UNUSED_GRAPH_MIN_BYTES = 1024
#: full collections before the walk, at most: one frees the cycles whose C++ autograd nodes
#: kept the next ones alive (three reentrant checkpoints' kept outputs: 42, 28, 14, 0)
MAX_COLLECTIONS = 16
MAX_PATHS_LISTED = 20
LEAK_KINDS = ("retained_graph", "retain_graph", "unused_graph")   # the order they are listed


def retained_graphs(profile: Profile) -> Outcome:
    """Live tensors whose graphs waste memory, one finding per root holder (the Python
    reference to change: `history`, not `history[0]['cache'][3]`), of one of three kinds:

    retained_graph  its graph reaches nodes of a step before the last one: it survived a
                    backward and an optimizer step (a leak that grows).
    retain_graph    its graph was built in the last step and backward ran through it with
                    retain_graph=True: all its saved tensors outlive backward and the
                    optimizer step (a higher peak every step).
    unused_graph    its graph was built in the last step, backward never ran through it,
                    and it still pins saved tensors.

    The bytes are what the bug pins: saved tensors still held by the graph and tensors of
    earlier steps the holder keeps, not what a correct loop holds anyway (the current step's
    outputs, tensors that existed before tracking). Needs the run's live context. Walks the
    live objects with the thread's tracer suspended (a coverage tool's: _C.untraced).
    """
    with _C.untraced():
        return _retained_graphs(profile)


def _retained_graphs(profile: Profile) -> Outcome:
    run = profile.run
    boundaries = run.step_seqs
    if run.live is None or len(boundaries) < 2:
        return Outcome([])  # no live state, or no step boundary to tell steps apart
    t0 = time.perf_counter()
    notes = []
    # Node sequence numbers at or after boundaries[i] were created in step i or later.
    last_step = _last_step(profile, len(boundaries) - 2)
    # a weight old-style weight_norm keeps on its module is no leak (record.recomputed_weights)
    kept = recomputed_weights(model_roots(run.live.model, run.live.named_roots))
    tensors, old, recent, truncated = _suspects(profile, boundaries, last_step)
    collect_s = None
    if any(g.tensor_id not in kept for g in old + recent) and _may_collect(profile):
        # the graphs found, of the tensors a collection leaves alive: not a second scan (the
        # walk's reads of saved tensors made Python tensors of them, which it would find)
        refs = [_weak(t) for t in tensors]
        del tensors   # (they would keep the garbage alive)
        collect_s = _collect_garbage()
        tensors = [t for t in (r() for r in refs) if t is not None]
        alive = {id(t) for t in tensors}
        old = [g for g in old if g.tensor_id in alive]
        recent = [g for g in recent if g.tensor_id in alive]
    kept_old = [g for g in old if g.tensor_id in kept]
    old = [g for g in old if g.tensor_id not in kept]
    recent = [g for g in recent if g.tensor_id not in kept]
    bounds: dict[int, int] = {}
    holders = find_holders(holder_roots(run.live), {g.tensor_id for g in old + recent},
                           bounds) if old or recent else {}
    if truncated:
        notes.append(f"retained_graphs checked only the first {MAX_GRAPH_NODES} autograd "
                     "nodes: leaks in graphs beyond them may be missed")
    by_id = {id(t): t for t in tensors}
    findings: list[Finding] = []
    if not any(holders.get(g.tensor_id) for g in old):
        # no name reaches an old graph now: the probe's, named while the loop's function ran,
        # win over the same graphs seen again here (they outlived that function in a cycle
        # through autograd's C++ nodes - a reentrant checkpoint's ctx keeps the block that
        # keeps them - where the collector is off): 42 unnamed rows where 3 `blocks.N.history`
        findings += _seen_while_running(profile, boundaries)
        probed = _probed_graphs(profile) if findings else set()
        old = [g for g in old if (g.storage, g.min_seq) not in probed]
    if old or recent:
        old_ids = {id(g) for g in old}
        context = _Context(profile, boundaries, last_step, old_ids, bounds=bounds)
        for names, group in _group_by_holder(old + recent, holders,
                                             lambda g: describe_unreached(
                                                 by_id[g.tensor_id], own=(tensors, by_id)),
                                             old_ids):
            findings.append(context.finding(names, group, holders))
    findings.sort(key=lambda f: (LEAK_KINDS.index(f.kind), -f.bytes))
    if kept_old:
        findings.append(_kept_weights(kept_old, kept))
    stats = {"retained_graph_check_s": time.perf_counter() - t0}
    if collect_s is not None:
        stats["retained_graph_collect_s"] = collect_s
    return Outcome(findings, notes, stats)


def _may_collect(profile: Profile) -> bool:
    """Whether the check frees the cyclic garbage before it judges the graphs it found (a
    correct loop leaves none to judge: no collection): a tensor only garbage keeps is kept by
    nothing, and the user's next collections free it (an object referring to itself and
    holding an output read as a retained graph held by "a Keeper not reachable from the
    model"). Collected rather than judged by a walk from the names: such a walk cannot see
    what C++ keeps (an autograd node's saved tensors, a ctx), the collector counts those
    references and frees only what nothing holds. Not where the user turned the collector
    off (gc.disable(): cycles are then never freed, they are kept), nor in an autosave
    mid-run (its frees would land in the step's log; the block's end replaces that save).
    torch.compile's first call leaves cycles (a compiled Hugging Face model read as 6
    retained_graph errors): collected whenever no session records. A nested block's frees
    land in the outer log where python running the script's block alone frees them."""
    if profile.meta.get("partial"):
        return False
    return gc.isenabled() or bool(profile.meta.get("compiled") and active_session() is None)


def _weak(t):
    """A weak reference to a tensor (a strong one where its type takes none)."""
    try:
        return weakref.ref(t)
    except TypeError:
        return lambda: t


def _collect_garbage() -> float:
    """Full collections until one frees nothing (its frees let go of cycles the next frees:
    reentrant checkpoints' kept outputs, 42 tensors, 28, 14, 0); their seconds."""
    t0 = time.perf_counter()
    for _ in range(MAX_COLLECTIONS):
        if not gc.collect():
            break
    return time.perf_counter() - t0


def _suspects(profile: Profile, boundaries: list[int], last_step: int):
    """(live graph tensors, graphs of earlier steps, unused graphs of the last step, whether
    the walk stopped at its bound) - what retained_graphs judges."""
    tensors = live_graph_tensors()
    graphs, truncated = walk_graphs(tensors,
                                    {storage_of(p)[0] for p in profile.run.live.params},
                                    past_the_log=bool(profile.meta.get("dropped")))
    # graphs that began before tracking started are not this run's to judge
    mine = [g for g in graphs if g.min_seq >= boundaries[0]]
    old = [g for g in mine if bisect.bisect_right(boundaries, g.min_seq) - 1 < last_step]
    recent = [g for g in mine if g.min_seq >= boundaries[last_step]
              and g.max_seq < boundaries[-1]
              and sum(b for p, b in g.saved.items() if p != g.storage)
              >= UNUSED_GRAPH_MIN_BYTES]
    return tensors, old, recent, truncated


def _kept_weights(graphs: list[GraphTensor], paths: dict[int, str]) -> Finding:
    """One info finding for the weights of earlier steps that old-style weight_norm (or
    spectral_norm) keeps on modules not called since: bounded, yet memory a user may
    wonder about, and one migration frees it."""
    names = sorted((paths[g.tensor_id] for g in graphs), key=_in_number_order)
    nbytes = sum(g.nbytes for g in graphs) + sum({p: b for g in graphs
                                                 for p, b in g.saved.items()}.values())
    n = len(names)
    listed = ", ".join(names[:3]) + (f" and {n - 3} more" if n > 3 else "")
    steps = sorted({g.min_seq for g in graphs})
    return Finding(
        kind="recomputed_weight", severity="info", bytes=int(nbytes),
        holder=names[0] if n == 1 else f"{n} modules' weights",
        evidence={"paths": names[:MAX_PATHS_LISTED], "paths_total": n,
                  "first_sequence_nr": int(steps[0])},
        message=(f"{'a weight' if n == 1 else f'{n} weights ({listed})'} that old-style "
                 f"torch.nn.utils.weight_norm (or spectral_norm) recomputed in an earlier "
                 f"step, kept with {'its' if n == 1 else 'their'} graph by the module until "
                 f"its next forward ({fmt_bytes(nbytes)}): by design, one per module, it "
                 "does not grow"),
        fix=("torch.nn.utils.parametrizations.weight_norm (spectral_norm) computes the "
             "weight when it is used and keeps none between steps"))


def _seen_while_running(profile: Profile, boundaries: list[int]) -> list[Finding]:
    """Retained graphs that record.leak_probe saw at a step end while the training loop's
    function ran, gone by the end of the block (that function had returned): judged as the
    end check judges, with what was alive at that step end and the holders named then."""
    rec = profile.run.records.get("leak_probe") or {}
    if not rec.get("graphs"):
        return []
    completed = int(rec["completed_steps"])
    last_step = _last_step(profile, completed - 1)
    graphs = [GraphTensor(**{**g, "saved": {int(p): int(b) for p, b in g["saved"]},
                             "shape": tuple(g["shape"]),
                             "unlogged": frozenset(g.get("unlogged") or ())})
              for g in rec["graphs"]]
    holders = {int(k): v for k, v in rec.get("holders", {}).items()}
    # the round before the last: what `loss = train_step(x, y)` still names in the caller
    # until the call returns (not a leak); older graphs, or ones a container holds, are
    previous = boundaries[_last_step(profile, last_step - 1)] if last_step else boundaries[0]
    old = [g for g in graphs if bisect.bisect_right(boundaries, g.min_seq) - 1 < last_step
           and not held_until_the_call_returns(g, holders.get(g.tensor_id), previous,
                                               boundaries[last_step])]
    at = [m["position"] for m in profile.markers("leak_probe") if m["value"] == completed]
    if not old or not at:
        return []
    bounds = {int(k): int(v) for k, v in rec.get("bounds", {}).items()}
    context = _Context(profile, boundaries, last_step, {id(g) for g in old},
                       at=("position", at[0] - 1), bounds=bounds)
    out = []
    # the probe kept only graphs a name reached: none is left to describe otherwise
    for names, group in _group_by_holder(old, holders, lambda g: "an unnamed reference"):
        f = context.finding(names, group, holders)
        f.evidence["seen_after_step"] = completed - 1
        f.message += (f" (seen at the end of step {completed - 1}, while the training loop's "
                      "function ran: it had returned by the end of the block, and its graphs "
                      "with it)")
        out.append(f)
    return out


def _probed_graphs(profile: Profile) -> set[tuple[int, int]]:
    """(storage, first sequence number) of each graph the probe recorded: a node's number is
    never reused, so the same graph seen again at the end has the same pair."""
    rec = profile.run.records.get("leak_probe") or {}
    return {(int(g["storage"]), int(g["min_seq"])) for g in rec.get("graphs") or ()}


def _last_step(profile: Profile, last_completed: int) -> int:
    """The first step whose tensors are still current after step `last_completed`: the
    last training iteration may legitimately still be referenced (its loss, its outputs);
    with several optimizers (a GAN) it spans one step of each, and a boundary without a
    forward pass after it (a final optimizer.step() for leftover micro-batches) is not one."""
    return min(_last_training_step(profile, last_completed),
               last_round_start(profile.run.records.get("step_owners", []),
                                last_completed))


def _last_training_step(profile: Profile, last_completed: int) -> int:
    """The last completed step that ran a forward pass (forward_start markers carry their
    step); `last_completed` when no forward was seen (no model's pass was recorded)."""
    fwd = [m["value"] for m in profile.markers("forward_start")]
    if not fwd:
        return last_completed
    return max(0, min(last_completed, max(fwd)))


def holder_roots(live) -> list[tuple[str, object]]:
    """Where holder names start: the model, the frame that ran the block, extra namespaces
    (a script's globals), the optimizer."""
    roots = model_roots(live.model, live.named_roots)
    roots += frame_roots(live.frame)
    if live.optimizer is not None:
        roots.append(("optimizer", live.optimizer))
    return roots + namespaces_roots(live.roots, live.frame)


def _group_by_holder(gs, holders, describe,
                     old_ids=frozenset()) -> list[tuple[list[str], list[GraphTensor]]]:
    """(holder names, graphs) per finding; `describe(g)` names what holds a graph no named
    root reaches: such graphs are one finding per description (and per kind: graphs of
    earlier steps, `old_ids`, apart from the last step's), not one each (a row per kept
    tensor of every step)."""
    groups: dict[str, list[GraphTensor]] = collections.defaultdict(list)
    unreached: list[GraphTensor] = []
    for g in gs:
        path = holders.get(g.tensor_id)
        if path:
            groups[root_holder(path)].append(g)
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
    unnamed: dict[tuple[str, bool], list[GraphTensor]] = {}
    for g in unreached:
        other = _overlapping(merged, [g])
        if other is not None:
            other[1].append(g)
        else:
            unnamed.setdefault((describe(g), id(g) in old_ids), []).append(g)
    return merged + [([name], group) for (name, _), group in unnamed.items()]


def _overlapping(merged, group):
    saved = set().union(*(g.saved for g in group)) | {g.storage for g in group}
    for entry in merged:
        other_saved = set().union(*(g.saved for g in entry[1]))
        other_all = other_saved | {g.storage for g in entry[1]}
        if saved and other_all and len(saved & other_all) >= 0.5 * min(len(saved),
                                                                        len(other_all)):
            return entry
    return None


class _Context:
    """What every finding of one check needs: the profile, the steps, the allocations alive
    at the end (what was allocated while tracking), the backward calls with retain_graph."""

    def __init__(self, profile: Profile, boundaries, last_step: int, old_ids: set[int],
                 at="end", bounds: dict | None = None):
        self.profile, self.boundaries, self.last_step = profile, boundaries, last_step
        self.old_ids = old_ids
        self.bounds = bounds or {}   # id(tensor) -> maxlen of the bounded deque holding it
        self.alive = _alive_allocations(profile, at)
        self.retain_roots = sorted({r for c in profile.run.records.get("backward") or []
                                    if c.get("retain_graph") for r in c["roots"]})
        self.param_shapes = {tuple(p.shape) for p in profile.run.live.params}
        model = profile.run.live.model
        buffers = getattr(model, "buffers", None)   # a module (or a container of models)
        self.buffer_ids = {id(b) for b in buffers()} if callable(buffers) else set()

    def step_of(self, seq: int) -> int:
        return bisect.bisect_right(self.boundaries, seq) - 1

    def pinned(self, gs) -> tuple[int, int, int]:
        """(total, saved, held) bytes the bug pins: saved tensors allocated while tracking
        and still held by the graphs, plus the holders' own tensors made before the last
        step (the current step's outputs are alive in a correct loop too)."""
        step = self.profile.memory["step"]
        # a storage allocated after the log filled is counted from the tensor (its address may
        # be a logged block's whose free was dropped: that block's size and step are not its)
        saved = {p: b for g in gs for p, b in g.saved.items()
                 if p in g.unlogged or p in self.alive}
        # (an unlogged tensor's step: its own node's, the last of its graph - a tensor made in
        # the last step whose graph reaches back, `total += loss`, is the current step's)
        held = {g.storage: g.nbytes for g in gs
                if g.storage not in saved and (
                    self.step_of(g.max_seq) < self.last_step if g.storage in g.unlogged else
                    g.storage in self.alive and step[self.alive[g.storage]] < self.last_step)}
        return sum(saved.values()) + sum(held.values()), sum(saved.values()), sum(held.values())

    def finding(self, names, gs, holders) -> Finding:
        old = [g for g in gs if id(g) in self.old_ids]
        retained = any(self._retained(g) for g in gs)
        kind = ("retained_graph" if old else "retain_graph" if retained else "unused_graph")
        holder = " and ".join(names)
        nbytes, saved_bytes, held_bytes = self.pinned(gs)
        steps = sorted({self.step_of(g.min_seq) for g in gs})
        logged = [g.storage for g in gs if g.storage not in g.unlogged]
        origin = _origin(self.profile, self.alive, logged)
        paths = sorted({holders[g.tensor_id] for g in gs if g.tensor_id in holders},
                       key=_in_number_order)
        n, nodes = len(gs), sum(g.nodes for g in gs)
        # saved tensors still held and no retain_graph: backward never ran through them
        never_backward = any(g.saved and not self._retained(g) for g in gs)
        evidence = {"tensors": n, "example_path": paths[0] if paths else names[0],
                    "paths": paths[:MAX_PATHS_LISTED], "paths_total": len(paths),
                    "steps": steps, "first_sequence_nr": int(min(g.min_seq for g in gs)),
                    "saved_bytes": int(saved_bytes), "tensor_bytes": int(held_bytes),
                    "retain_graph": retained}
        inside = ""
        if len(paths) > 1:
            more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
            inside = f" at {len(paths)} paths ({', '.join(paths[:3])}{more})"
        what = (f"{n} tensor{'s' if n > 1 else ''} (grad_fn {gs[0].grad_fn}, {nodes} graph "
                f"nodes){inside}")
        made = f"; created by {origin}" if origin else "" if logged else \
            "; allocated after the event log filled: their creator is not recorded"
        fix = fix_text(kind, names, paths, gs, retained=retained,
                       never_backward=never_backward, param_shapes=self.param_shapes,
                       buffer=any(g.tensor_id in self.buffer_ids for g in gs),
                       carried=all(self.step_of(g.max_seq) >= self.last_step
                                   for g in gs if g.tensor_id in holders))
        bound = max(self.bounds[g.tensor_id] for g in gs) \
            if all(g.tensor_id in self.bounds for g in gs) else None
        span = f"{steps[0]}" + (f"-{steps[-1]}" if len(steps) > 1 else "")
        if kind == "retained_graph" and bound is not None:
            # a deque(maxlen=n) keeps n steps' graphs: a higher peak, not a leak that grows
            evidence["bounded_to"] = bound
            message = (f"{what} with autograd history from step {span} kept in a deque "
                       f"bounded to {bound} items, pinning {fmt_bytes(nbytes)}{made}: it "
                       "stops growing once full, but every graph it keeps stays alive")
            fix = ("keep `.detach()`ed tensors (or `.item()` for numbers) in the deque: the "
                   "values stay, the graphs go")
            severity = "warning"
        elif kind == "retained_graph":
            message = (f"{what} with autograd history from step {span} still alive after "
                       f"later steps' backward, pinning {fmt_bytes(nbytes)}{made}")
            severity = "error"
        elif kind == "retain_graph":
            message = (f"{what}: backward ran through this graph with retain_graph=True, so "
                       f"its {fmt_bytes(saved_bytes)} of saved tensors stay alive through the "
                       f"optimizer step and the next forward{made}")
            severity = "warning"
        else:
            message = (f"{what} built in step {steps[-1]} that backward never used: its graph "
                       f"kept {fmt_bytes(saved_bytes)} of saved tensors alive through backward "
                       f"and the optimizer step{made}")
            severity = "warning"
        return Finding(kind=kind, severity=severity, bytes=int(nbytes), holder=holder,
                       evidence=evidence, message=message, fix=fix)

    def _retained(self, g) -> bool:
        """Backward ran with retain_graph=True from a root inside this graph's range."""
        i = bisect.bisect_left(self.retain_roots, g.min_seq)
        return i < len(self.retain_roots) and self.retain_roots[i] <= g.max_seq


def _alive_allocations(profile: Profile, at="end") -> dict[int, int]:
    """ptr -> memory position of the allocation alive at `at` (the end, or a position)."""
    alive = profile.alive_at(at)
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
