"""The native per-event columns of a Profile (pairing pass columns, categories, modules) equal the
numpy rules they replaced, on real recorded runs; and each rule matters in one of those runs, so
a rule the native code dropped would fail the comparison."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import memprof
from memprof import _C
from memprof.record.events import (CAT_ACTIVATIONS, CAT_COMMUNICATION, CAT_OTHER,
                                   CAT_TEMPORARIES, PHASE_BACKWARD, PHASE_FORWARD)

from test_pairs import pairs_by_sort  # the sort-based definition of the pairing

CATEGORY_RULES = ("forward", "phase_run", "freed_by_backward", "c10d", "snapshots", "frees")
MODULE_RULES = ("backward_seq", "snapshots", "frees")


def ref_frees_take_their_alloc(values, sizes, alloc_of, unknown=None):
    frees = np.flatnonzero(sizes < 0)
    owner = alloc_of[frees]
    other = values[frees] if unknown is None else unknown
    values[frees] = np.where(owner >= 0, values[np.maximum(owner, 0)], other)
    return values


def ref_columns(prof):
    """(free_of, alloc_of, sizes, phases, effective_size, live) the numpy way."""
    mem = prof.memory
    free_of, alloc_of = (a.astype(np.int32) for a in pairs_by_sort(mem["ptr"].copy(),
                                                                    mem["size"].copy()))
    sizes = np.ascontiguousarray(mem["size"])
    phases = np.ascontiguousarray(mem["phase"])
    effective = sizes.copy()
    effective[(effective < 0) & (alloc_of < 0)] = 0
    return free_of, alloc_of, sizes, phases, effective, np.cumsum(effective, dtype=np.int64)


def ref_snapshot_hits(prof):
    """[(snapshot, [(allocation event, storage index)])]: per snapshot storage, the latest
    allocation of its address before the snapshot's marker not freed before it - one query at
    a time (what allocation_lookup does for all of them at once)."""
    mem = prof.memory
    free_of = ref_columns(prof)[0]
    out = []
    for snap in prof.snapshots:
        pos = prof._memory_position(snap.marker)
        hits = []
        for k, ptr in enumerate(snap.ptrs):
            allocs = np.flatnonzero((mem["ptr"][:pos] == ptr) & (mem["size"][:pos] > 0))
            if allocs.size and (free_of[allocs[-1]] < 0 or free_of[allocs[-1]] >= pos):
                hits.append((int(allocs[-1]), k))
        out.append((snap, hits))
    return out


def ref_seq_module(prof) -> dict:
    """Autograd sequence number -> module of the first forward op recorded with it."""
    out = {}
    for rec in prof.seq_records:
        out.setdefault(int(rec["seq"]), int(rec["module"]))
    return out


def ref_category(prof, drop=()):
    mem = prof.memory
    n = mem.size
    cat = np.full(n, CAT_OTHER, dtype=np.int8)
    if n == 0:
        return cat
    free_of, alloc_of, size, phase, _, _ = ref_columns(prof)
    is_alloc = size > 0
    never_freed = free_of < 0
    change = np.flatnonzero(phase[1:] != phase[:-1]) + 1
    ends = np.append(change, n) - 1
    starts = np.insert(change, 0, 0)
    run_end = np.repeat(ends, ends - starts + 1)
    freed_in_run = ~never_freed & (free_of <= run_end)
    fwd_end = prof.marker_positions("forward_end")
    fwd = is_alloc & (phase == PHASE_FORWARD)
    if fwd.any() and "forward" not in drop:
        idx = np.flatnonzero(fwd)
        nxt = np.searchsorted(fwd_end, idx, side="right")
        end_pos = (np.where(nxt < fwd_end.size, fwd_end[np.minimum(nxt, fwd_end.size - 1)], n)
                   if fwd_end.size else np.full(idx.size, n))
        outlived = never_freed[idx] | (free_of[idx] >= end_pos)
        cat[idx] = np.where(outlived, CAT_ACTIVATIONS, CAT_TEMPORARIES)
    if "phase_run" not in drop:
        cat[is_alloc & ~fwd & freed_in_run] = CAT_TEMPORARIES
    if "freed_by_backward" not in drop:
        freed_by_backward = np.zeros(n, dtype=bool)
        freed_by_backward[~never_freed] = phase[free_of[~never_freed]] == PHASE_BACKWARD
        cat[is_alloc & (phase != PHASE_BACKWARD) & freed_by_backward] = CAT_ACTIVATIONS
    c10d = [i for i, name in enumerate(prof.strings) if "c10d" in name.split("::")[0]]
    if c10d and "c10d" not in drop:
        cat[is_alloc & np.isin(mem["op"], c10d)] = CAT_COMMUNICATION
    if "snapshots" not in drop:
        for snap, hits in ref_snapshot_hits(prof):
            for i, _ in hits:
                cat[i] = snap.category
    if "frees" in drop:
        return cat
    return ref_frees_take_their_alloc(cat, size, alloc_of, CAT_OTHER)


def ref_event_module(prof, drop=()):
    mem = prof.memory
    module = mem["module"].copy()
    lookup = ref_seq_module(prof)
    if lookup and "backward_seq" not in drop:
        bwd = np.flatnonzero((mem["phase"] == PHASE_BACKWARD) & (mem["seq"] >= 0)
                             & (module < 0))
        if bwd.size:
            uniq, inv = np.unique(mem["seq"][bwd], return_inverse=True)
            mapped = np.array([lookup.get(int(s), -1) for s in uniq], dtype=np.int32)
            module[bwd] = mapped[inv]
    if "snapshots" not in drop:
        for snap, hits in ref_snapshot_hits(prof):
            if snap.modules is not None:
                for i, k in hits:
                    module[i] = snap.modules[k]
    if "frees" in drop:
        return module
    _, alloc_of, sizes, _, _, _ = ref_columns(prof)
    return ref_frees_take_their_alloc(module, sizes, alloc_of)


def ref_step_allocated(prof):
    size = np.ascontiguousarray(prof.memory["size"])
    return [int(size[s.start:s.end][size[s.start:s.end] > 0].sum()) for s in prof.steps]


# ------------------------------------------------------------------ recorded runs
def run_training(mlp):
    opt = torch.optim.Adam(mlp.parameters())
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    with memprof.track(mlp, opt) as prof:
        for _ in range(3):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(mlp(x), y)
            loss.backward()
            opt.step()
    return prof


def run_forward_only(mlp):
    x = torch.randn(32, 64)
    with memprof.track(mlp) as prof:
        kept = [mlp(x) for _ in range(3)]
        with torch.no_grad():
            for _ in range(3):
                mlp(x) * 2
    del kept
    return prof


def run_freeing_blocks_from_before(mlp):
    """Frees of the model's parameters (known: prepended) and of CPU blocks an earlier session
    watched (unknown here: untracked frees)."""
    with memprof.track():     # CPU frees are seen for blocks made while a session watched
        before = [torch.empty(1000 + i) for i in range(20)]
        mlp.fc2.bias = torch.nn.Parameter(torch.zeros(10))
    with memprof.track(mlp) as prof:
        mlp.fc2.bias = torch.nn.Parameter(torch.ones(10))
        del before[:]
        out = mlp(torch.randn(8, 64))
        del out
    return prof


def run_empty(mlp):
    import gc
    gc.collect()   # the runs before left cycles holding blocks a session watched: freed now,
    # not inside this block (run alone, this file's collection otherwise came inside it)
    with memprof.track() as prof:
        pass
    return prof


def run_with_step_markers(mlp):
    x = torch.randn(16, 64)
    with memprof.track(mlp) as prof:
        for i in range(4):
            loss = mlp(x).sum()
            loss.backward()
            for p in mlp.parameters():
                p.grad = None
            torch.empty(100 * (i + 1))
            prof.step()
        torch.empty(7)
    return prof


def run_collectives(mlp):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        group = dist.group.WORLD.group_name
        with memprof.track(mlp) as prof:
            t = mlp(torch.randn(4, 64)).detach()
            for _ in range(3):
                reduced = torch.ops._c10d_functional.all_reduce(t, "sum", group)
                torch.ops._c10d_functional.wait_tensor(reduced)
                del reduced
    finally:
        dist.destroy_process_group()
    return prof


RUNS = {"training": run_training, "forward_only": run_forward_only,
        "frees_from_before": run_freeing_blocks_from_before, "empty": run_empty,
        "step_markers": run_with_step_markers, "collectives": run_collectives}


@pytest.fixture(scope="module")
def profiles():
    from tiny_mlp import MLP
    out = {}
    for name, run in RUNS.items():
        torch.manual_seed(0)
        out[name] = run(MLP())
    return out


def same(a, b) -> bool:
    return a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("name", list(RUNS))
def test_native_columns_equal_the_numpy_rules(profiles, name):
    prof = profiles[name]
    free_of, alloc_of, sizes, phases, effective, live = ref_columns(prof)
    assert same(prof.free_of, free_of) and same(prof.alloc_of, alloc_of)
    assert same(prof._sizes, sizes) and same(prof._phases, phases)
    assert same(prof.effective_size, effective) and not prof.effective_size.flags.writeable
    assert same(prof.live_bytes(), live)
    assert prof.untracked_frees == int(((sizes < 0) & (alloc_of < 0)).sum())
    assert same(prof.category, ref_category(prof))
    assert same(prof.event_module, ref_event_module(prof))
    assert [s.allocated for s in prof.steps] == ref_step_allocated(prof)


def test_the_runs_exercise_every_rule(profiles):
    """Each rule changes the numpy result of at least one run: the equality above covers it."""
    for rule in CATEGORY_RULES:
        assert any(not np.array_equal(ref_category(p), ref_category(p, drop=(rule,)))
                   for p in profiles.values()), rule
    for rule in MODULE_RULES:
        assert any(not np.array_equal(ref_event_module(p), ref_event_module(p, drop=(rule,)))
                   for p in profiles.values()), rule
    before = profiles["frees_from_before"]
    assert before.untracked_frees > 0
    owners = before.alloc_of[before.memory["size"] < 0]
    assert (before.memory["thread"][owners[owners >= 0]] == -1).any()  # a prepended block freed
    # four marked steps; the torch.empty(7) after the last marker is recorded, but outside
    # any pass it is no step of its own (bookkeeping after the last step)
    marked = profiles["step_markers"]
    assert len(marked.steps) == 4 and marked.steps[-1].end < marked.memory.size
    assert profiles["empty"].memory.size == 0


def test_native_categories_follow_each_rule_on_a_hand_made_stream():
    """One allocation per rule (phases: forward, backward, optimizer), frees after."""
    F, B, O = PHASE_FORWARD, PHASE_BACKWARD, 3
    #          0 fwd act  1 fwd tmp  2 opt tmp  3 opt kept  4 opt->bwd  5 c10d
    size = np.array([8, 8, -8, 8, -8, 8, 8, 8, -8, -8, -8, -4], dtype=np.int64)
    phase = np.array([F, F, F, O, O, O, O, O, B, B, B, B], dtype=np.int8)
    ptr = np.array([1, 2, 2, 3, 3, 4, 5, 6, 5, 1, 6, 9], dtype=np.uint64) * 64
    op = np.array([0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0], dtype=np.int32)
    free_of, alloc_of = _C.pair_allocations(ptr, size, phase, op)[:2]
    cat = _C.allocation_categories(size, phase, free_of, np.array([3], dtype=np.int64), op, [1],
                                   activations=CAT_ACTIVATIONS, temporaries=CAT_TEMPORARIES,
                                   other=CAT_OTHER, communication=CAT_COMMUNICATION)
    A, T, X, C = CAT_ACTIVATIONS, CAT_TEMPORARIES, CAT_OTHER, CAT_COMMUNICATION
    assert cat.tolist() == [A, T, X, T, X, X, A, C, X, X, X, X]
    _C.frees_take_their_alloc(cat, size, alloc_of, CAT_OTHER)
    assert cat.tolist() == [A, T, T, T, T, X, A, C, A, A, C, X]
    module = np.arange(12, dtype=np.int32)
    _C.frees_take_their_alloc(module, size, alloc_of)
    assert module.tolist() == [0, 1, 1, 3, 3, 5, 6, 7, 6, 0, 7, 11]
