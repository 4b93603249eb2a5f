"""Allocations found by address and position, and forward modules by autograd sequence number,
as whole-array lookups: what the category snapshots name, and whose module a backward event
is. Leaving a long run's block did these one snapshot and one sequence number at a time in
Python (a run of 300 parameters: one snapshot per step, a sort and searchsorted each, and a
dict built record by record), about a third of its time.
"""
from __future__ import annotations

import numpy as np

from . import _C


#: in snapshot_modules: a storage of a snapshot that names no modules (-1 is "no module")
NO_MODULES = np.iinfo(np.int32).min


def snapshot_hits(memory: np.ndarray, snapshots: list,
                  positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(snapshot, allocation event, storage) for each storage of each snapshot with an
    allocation alive at its marker's memory position in the stream `memory` (made before it,
    not freed before it; `positions[i]`: the i-th snapshot's), in snapshot order (a later
    snapshot's naming comes after an earlier one's); storages are numbered over all the
    snapshots' addresses in order, as snapshot_modules numbers them."""
    counts = np.array([len(s.ptrs) for s in snapshots], dtype=np.int64)
    if counts.sum() == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    ptrs = np.concatenate([np.asarray(s.ptrs, dtype=np.uint64) for s in snapshots if len(s.ptrs)])
    owner = np.repeat(np.arange(len(snapshots)), counts)
    query, allocs = _C.allocations_alive_at(memory["ptr"], memory["size"], ptrs,
                                            np.asarray(positions, dtype=np.int64)[owner])
    return owner[query], allocs, query


def snapshot_modules(snapshots: list) -> np.ndarray:
    """The owning module of every snapshot's storages, numbered as snapshot_hits numbers
    them; NO_MODULES for those of a snapshot that names none."""
    parts = [np.asarray(s.modules, dtype=np.int32) if s.modules is not None
             else np.full(len(s.ptrs), NO_MODULES, dtype=np.int32) for s in snapshots]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def snapshot_trainable(snapshots: list) -> np.ndarray:
    """Per storage of every snapshot, numbered as snapshot_hits numbers them: 1 where a
    parameter at it requires grad, 0 frozen, 2 not trained (a model beside the
    one that trains: an EMA copy), -1 not noted (another category; a profile saved
    before memprof noted it)."""
    parts = [np.asarray(s.trainable, dtype=np.int8) if s.trainable is not None
             else np.full(len(s.ptrs), -1, dtype=np.int8) for s in snapshots]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int8)


def last_per_allocation(allocs: np.ndarray) -> np.ndarray:
    """Indices into `allocs` of the last entry for each allocation (a later snapshot names an
    allocation over an earlier one)."""
    reverse = allocs[::-1]
    _, first = np.unique(reverse, return_index=True)
    return allocs.size - 1 - first


def forward_modules(seq_records: np.ndarray, seqs: np.ndarray) -> np.ndarray:
    """Per sequence number in `seqs`: the module of the forward op that created its autograd
    node (the first record of that number), -1 where none was recorded."""
    out = np.full(seqs.shape, -1, dtype=np.int32)
    if seq_records.size == 0 or seqs.size == 0:
        return out
    known, first = np.unique(seq_records["seq"], return_index=True)
    r = np.minimum(np.searchsorted(known, seqs), known.size - 1)
    found = known[r] == seqs
    out[found] = seq_records["module"][first[r[found]]]
    return out
