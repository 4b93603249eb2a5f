"""Allocation/free pairing (`memprof._C.pair_allocations`) equals the sort-based definition:
sorted by (address, time), a free right after an allocation of its address releases it."""
from __future__ import annotations

import numpy as np
import torch

import memprof
from memprof import _C


def pairs_by_sort(ptr: np.ndarray, size: np.ndarray):
    n = ptr.size
    order = np.argsort(ptr, kind="stable")
    ptr_s, size_s = ptr[order], size[order]
    free_of = np.full(n, -1, dtype=np.int64)
    alloc_of = np.full(n, -1, dtype=np.int64)
    if n > 1:
        ok = (ptr_s[1:] == ptr_s[:-1]) & (size_s[:-1] > 0) & (size_s[1:] < 0)
        free_of[order[:-1][ok]] = order[1:][ok]
        alloc_of[order[1:][ok]] = order[:-1][ok]
    return free_of, alloc_of


def native_pairs(ptr: np.ndarray, size: np.ndarray):
    """(free_of, alloc_of) of the native pass (phase and module columns do not affect them)."""
    n = ptr.size
    return _C.pair_allocations(ptr, size, np.zeros(n, np.int8), np.zeros(n, np.int32))[:2]


def random_stream(rng, n: int, addresses: int):
    """Allocations and frees over few addresses (heavy reuse, as allocators do), with frees of
    blocks never seen allocated and allocations never freed."""
    ptr = np.empty(n, dtype=np.uint64)
    size = np.empty(n, dtype=np.int64)
    live: dict[int, int] = {}
    for i in range(n):
        a = int(rng.integers(1, addresses + 1)) * 64
        if a in live and rng.random() < 0.8:
            ptr[i], size[i] = a, -live.pop(a)
        elif a not in live and rng.random() < 0.9:
            live[a] = int(rng.integers(1, 1 << 20))
            ptr[i], size[i] = a, live[a]
        else:      # a free of a block from before the stream
            ptr[i], size[i] = a, -int(rng.integers(1, 1 << 20))
    return ptr, size


def test_native_pairing_equals_the_sort_definition_on_random_streams():
    rng = np.random.default_rng(0)
    for n, addresses in ((0, 1), (1, 1), (2, 1), (1000, 3), (5000, 50), (200_000, 5000)):
        ptr, size = random_stream(rng, n, addresses)
        free_of, alloc_of = native_pairs(ptr, size)
        ref_free, ref_alloc = pairs_by_sort(ptr, size)
        assert np.array_equal(free_of, ref_free) and np.array_equal(alloc_of, ref_alloc), n
        assert free_of.dtype == np.int32


def alive_by_definition(ptr, size, query_ptr, query_pos):
    """(query, allocation) per query: the latest allocation of its address before its position
    whose free (by the sort definition) is not before it."""
    free_of, _ = pairs_by_sort(ptr, size)
    out = []
    for k, (q, pos) in enumerate(zip(query_ptr, query_pos)):
        pos = min(max(int(pos), 0), ptr.size)
        allocs = np.flatnonzero((ptr[:pos] == q) & (size[:pos] > 0))
        if allocs.size and (free_of[allocs[-1]] < 0 or free_of[allocs[-1]] >= pos):
            out.append((k, int(allocs[-1])))
    return out


def test_allocations_alive_at_equal_the_definition_on_random_streams():
    """The category snapshots' lookup (allocation_lookup.snapshot_hits): one replay of the
    stream for all the queries, in any order of positions, unknown addresses and address 0
    included, positions past either end clamped."""
    rng = np.random.default_rng(1)
    for n, addresses, queries in ((0, 1, 3), (1, 1, 4), (500, 3, 200), (5000, 40, 2000)):
        ptr, size = random_stream(rng, n, addresses)
        query_ptr = (rng.integers(0, addresses + 2, queries) * 64).astype(np.uint64)
        query_pos = rng.integers(-2, n + 3, queries).astype(np.int64)
        got_query, got_alloc = _C.allocations_alive_at(ptr, size, query_ptr, query_pos)
        assert list(zip(got_query.tolist(), got_alloc.tolist())) == \
            alive_by_definition(ptr, size, query_ptr, query_pos), n
        assert list(got_query) == sorted(got_query)   # in query order


def test_pairing_of_a_real_run_reads_the_event_columns_in_place():
    with memprof.track() as prof:
        keep = [torch.empty(1000 + i) for i in range(50)]
        for _ in range(100):
            torch.ones(64) * 2
    mem = prof.memory
    ref_free, ref_alloc = pairs_by_sort(mem["ptr"].copy(), mem["size"].copy())
    assert np.array_equal(prof.free_of, ref_free)
    assert np.array_equal(prof.alloc_of, ref_alloc)
    assert (prof.free_of >= 0).sum() >= 100
    del keep
