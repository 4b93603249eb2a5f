"""Live tensors with autograd history and what their graphs pin: the sequence-number range of
each graph (which steps created it), its node count, and the saved tensors it still holds."""
from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field

import torch

from .. import _C

MAX_GRAPH_NODES = 200_000       # per analysis, over all graphs (shared visited set)
ACCUMULATE_GRAD_SEQ = 1 << 62   # AccumulateGrad nodes have UINT64_MAX as sequence number


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
    shape: tuple = ()
    #: its own and its saved storages allocated after the event log filled (asked for with
    #: walk_graphs(past_the_log=True)): the log holds no allocation of theirs, and a logged
    #: block whose free was dropped may have had the same address
    unlogged: frozenset = frozenset()


def storage_of(t: torch.Tensor) -> tuple[int, int]:
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


def graph_tensors(objects) -> list[torch.Tensor]:
    """The real tensors with autograd history among `objects` (fake tensors belong to
    memprof.plan's estimates, not to the run being checked)."""
    from torch._subclasses.fake_tensor import FakeTensor
    out = []
    tensor_type = torch.Tensor
    # one verdict per type (a few thousand types for hundreds of thousands of objects once
    # torch.distributed or transformers is loaded: the scan is what leaving a block waits for)
    is_real_tensor: dict[type, bool] = {}
    for obj in objects:
        # issubclass(type(...)) rather than isinstance: never triggers a lazy __class__
        cls = type(obj)
        verdict = is_real_tensor.get(cls)
        if verdict is None:
            verdict = is_real_tensor[cls] = issubclass(cls, tensor_type) and \
                not issubclass(cls, FakeTensor)
        if verdict:
            try:
                if obj.grad_fn is not None:
                    out.append(obj)
            except Exception:  # noqa: BLE001
                continue
    return out


def live_graph_tensors() -> list[torch.Tensor]:
    """Every Python-visible real tensor that has autograd history."""
    return graph_tensors(gc.get_objects())


def walk_graphs(tensors: list[torch.Tensor], exclude_storages: set[int],
                past_the_log: bool = False) -> tuple[list[GraphTensor], bool]:
    """Sequence range, node count and unreleased saved tensors of each tensor's graph, and
    whether the node budget ran out (then later graphs were only partly walked).
    `past_the_log`: the event log dropped allocations; each graph notes which of its
    storages were among them (GraphTensor.unlogged)."""
    unlogged: set[int] = set()
    asked: set[int] = set()

    def note(tensor, ptr: int) -> None:
        if past_the_log and ptr and ptr not in asked:
            asked.add(ptr)
            if _C.plain_storage_addresses([tensor])[0] == 0:   # (0: allocated past the log)
                unlogged.add(ptr)

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
                ptr, nb = storage_of(s)
                if ptr and ptr not in exclude_storages:
                    saved[ptr] = nb
                    note(s, ptr)
            for nxt, _ in getattr(node, "next_functions", ()):
                if nxt is not None:
                    stack.append(nxt)
        visited[id(root)] = (lo, hi, count, saved)
        ptr, nb = storage_of(t)
        note(t, ptr)
        mine = frozenset(x for x in (ptr, *saved) if x in unlogged) if unlogged else frozenset()
        results.append(GraphTensor(id(t), lo if hi >= 0 else -1, hi, nb, ptr, t.numel(),
                                   type(root).__name__, count, saved, tuple(t.shape), mine))
    return results, budget <= 0
