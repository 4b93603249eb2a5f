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
import time

from ..finding import Finding
from ..profile import Profile
from ..units import fmt_bytes
from .autograd_graphs import MAX_GRAPH_NODES, GraphTensor, live_graph_tensors, storage_of, walk_graphs
from .outcome import Outcome
from .holders import describe_unreached, find_holders, frame_roots, namespace_roots

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


def retained_graphs(profile: Profile) -> Outcome:
    """Two ways a live tensor's graph wastes memory, grouped by the Python reference holding it:

    retained_graph  its graph reaches nodes of a step before the last one: it survived a
                    backward and an optimizer step (a leak that grows).
    unused_graph    its graph was built in the last completed step, backward never ran
                    through it, and it still pins saved tensors: they stayed alive through
                    backward and the optimizer step (a higher peak every step).

    Needs the run's live context (the process that recorded it, right after the block).
    """
    run = profile.run
    boundaries = run.step_seqs
    if run.live is None or len(boundaries) < 2:
        return Outcome([])  # no live state, or no step boundary to tell steps apart
    t0 = time.perf_counter()
    notes = []
    # Node sequence numbers at or after boundaries[i] were created in step i or later; the
    # last step that trained may legitimately still be referenced (its loss, its outputs),
    # also when a boundary without a forward pass came after it (a final optimizer.step()
    # for the leftover micro-batches after the loop).
    last_step = _last_training_step(profile, len(boundaries) - 2)
    tensors = live_graph_tensors()
    graphs, truncated = walk_graphs(tensors, {storage_of(p)[0] for p in run.live.params})
    if truncated:
        notes.append(f"retained_graphs checked only the first {MAX_GRAPH_NODES} autograd "
                     "nodes: leaks in graphs beyond them may be missed")
    by_id = {id(t): t for t in tensors}
    # graphs that began before tracking started are not this run's to judge
    mine = [g for g in graphs if g.min_seq >= boundaries[0]]
    old = [g for g in mine if bisect.bisect_right(boundaries, g.min_seq) - 1 < last_step]
    unused = [g for g in mine if g.min_seq >= boundaries[last_step]
              and g.max_seq < boundaries[-1]
              and sum(b for p, b in g.saved.items() if p != g.storage) >= UNUSED_GRAPH_MIN_BYTES]
    findings: list[Finding] = []
    if old or unused:
        holders = find_holders(_roots(run.live), {g.tensor_id for g in old + unused})
        alive = _alive_allocations(profile)
        for kind, gs in (("retained_graph", old), ("unused_graph", unused)):
            for names, group in _group_by_holder(gs, holders, by_id):
                findings.append(_finding(kind, names, group, holders, boundaries, profile,
                                         alive))
    findings.sort(key=lambda f: (f.kind != "retained_graph", -f.bytes))
    return Outcome(findings, notes, {"retained_graph_check_s": time.perf_counter() - t0})


def _last_training_step(profile: Profile, last_completed: int) -> int:
    """The last completed step that ran a forward pass (forward_start markers carry their
    step); `last_completed` when no forward was seen (module hooks off)."""
    fwd = [m["value"] for m in profile.markers("forward_start")]
    if not fwd:
        return last_completed
    return max(0, min(last_completed, max(fwd)))


def _roots(live) -> list[tuple[str, object]]:
    """Where holder names start: the model, the frame that ran the block, extra namespaces
    (a script's globals), the optimizer."""
    roots = [("model", live.model)] if live.model is not None else []
    roots += frame_roots(live.frame)
    for prefix, namespace in live.roots:
        roots += namespace_roots(prefix, namespace)
    if live.optimizer is not None:
        roots.append(("optimizer", live.optimizer))
    return roots


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
                    f"steps' backward, pinning {fmt_bytes(nbytes)}{made}",
            fix=_fix_for(example, gs[0].numel, gs[0].grad_fn))
    return Finding(
        kind=kind, severity="warning", bytes=int(saved_bytes), holder=holder,
        evidence=evidence,
        message=f"{what} built in step {steps[-1]} that backward never used: its graph kept "
                f"{fmt_bytes(saved_bytes)} of saved tensors alive through backward and the optimizer "
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
