"""Memory the passes spend recomputing a weight from its parameters: the same at any batch.

A parametrization (`torch.nn.utils.parametrizations.weight_norm` / `spectral_norm`,
`parametrize.register_parametrization`: a LoRA-style `W + B @ A`) recomputes the weight at
each access, inside `<module>.parametrizations.<name>` (torch's ParametrizationList, a
module memprof names, known by type: scope_owners); the forward saves it for backward. Backward then makes the weight's
gradient (in the backward of the op that used the weight: the module's linear) and frees it
in the parametrization's own backward. Old-style `weight_norm` / `spectral_norm` keep their
weight on the module (the snapshots name it, record.recomputed_weights); its gradient is
freed in the backward of the op that made it. None of these grows with the batch: the weight
is the category `recomputed_weights`, owned by the parametrized module; its gradient and
the temporaries of the recomputing ops' backward stay `temporaries` (what they are: short
lived, in backward), found by `weight_gradients`; the scaled fit keeps both whole. Found
from the event log alone (module ids, autograd sequence numbers), so recording pays nothing
for them."""
from __future__ import annotations

import numpy as np

from .record.events import (CAT_ACTIVATIONS, CAT_RECOMPUTED_WEIGHTS, CAT_TEMPORARIES,
                            PHASE_BACKWARD, PHASE_FORWARD)

#: the attribute torch.nn.utils.parametrize keeps a module's ParametrizationLists under
PARAMETRIZATIONS = "parametrizations"


def scope_owners(profile) -> np.ndarray:
    """Per module id: for torch's ParametrizationList or a module inside one, the id of the
    parametrized module; -1 for the others. The lists are those the recording found by type
    (record.recomputed_weights.parametrization_lists: a user's own module named
    `parametrizations` is none); a profile without that record (an older file) reads every
    module inside `<module>.parametrizations` as one."""
    names = profile.modules
    lists = profile.run.records.get("parametrizations")
    out = np.full(len(names), -1, dtype=np.int64)
    if lists is None:
        return _owners_by_name(names, out)
    owner_of = {names[lid]: owner for lid, owner in lists}
    for i, name in enumerate(names if owner_of else ()):
        parts = name.split(".")
        for k in range(len(parts), 0, -1):   # the innermost list holding it
            owner = owner_of.get(".".join(parts[:k]))
            if owner is not None:
                out[i] = owner
                break
    return out


def _owners_by_name(names: list[str], out: np.ndarray) -> np.ndarray:
    ids = {name: i for i, name in enumerate(names)}
    for i, name in enumerate(names):
        parts = name.split(".")
        if PARAMETRIZATIONS in parts[:-1]:
            at = len(parts) - 1 - parts[::-1].index(PARAMETRIZATIONS)   # the innermost
            if at < len(parts) - 1:
                out[i] = ids.get(".".join(parts[:at]), -1)
    return out


def _in_scope(module: np.ndarray, owners: np.ndarray) -> np.ndarray:
    m = module.astype(np.int64)
    ok = (m >= 0) & (m < owners.size)
    out = np.zeros(m.shape, dtype=bool)
    out[ok] = owners[m[ok]] >= 0
    return out


def recomputation(profile, category: np.ndarray) -> np.ndarray:
    """Allocations (indices) of forward or backward activations and temporaries made inside
    a parametrization: the weight it recomputes and its intermediates."""
    owners, memory = scope_owners(profile), profile.memory
    if not (owners >= 0).any():
        return np.zeros(0, dtype=np.int64)     # (a model without any: no pass over events)
    phases = memory["phase"]
    candidate = (memory["size"] > 0) & np.isin(category, (CAT_ACTIVATIONS, CAT_TEMPORARIES)) \
        & ((phases == PHASE_FORWARD) | (phases == PHASE_BACKWARD))
    return np.flatnonzero(candidate & _in_scope(memory["module"], owners))


def other_calls(memory: np.ndarray, category: np.ndarray) -> np.ndarray:
    """Allocations (indices) of old-style weights that no snapshot names: a step's end names
    the weight the module keeps then, its last call's; a module called more than once a step
    (a shared layer, a discriminator on the real and the fake batch) made one at each call
    before it - in its forward, by the same op, of the same size."""
    sizes, phases, modules, ops = memory["size"], memory["phase"], memory["module"], memory["op"]
    named = np.flatnonzero((category == CAT_RECOMPUTED_WEIGHTS) & (sizes > 0)
                           & (phases == PHASE_FORWARD) & (modules >= 0))
    if not named.size:
        return np.zeros(0, dtype=np.int64)     # (a model without any: no pass over events)
    candidate = (sizes > 0) & (phases == PHASE_FORWARD) \
        & np.isin(category, (CAT_ACTIVATIONS, CAT_TEMPORARIES))
    out = np.zeros(sizes.size, dtype=bool)
    for m, o, size in set(zip(modules[named].tolist(), ops[named].tolist(),
                              sizes[named].tolist())):
        out |= candidate & (modules == m) & (ops == o) & (sizes == size)
    return np.flatnonzero(out)


def mark(profile, category: np.ndarray) -> None:
    """Sets, in place, the category of those allocations, and of other_calls', to
    `recomputed_weights` (category: as the snapshots left it)."""
    category[recomputation(profile, category)] = CAT_RECOMPUTED_WEIGHTS
    category[other_calls(profile.memory, category)] = CAT_RECOMPUTED_WEIGHTS


def own(profile, module: np.ndarray) -> None:
    """Rewrites, in place, the module of recomputed-weight allocations made inside a
    parametrization to the parametrized module (`Sequential.1`, not
    `Sequential.1.parametrizations.weight.0`)."""
    owners = scope_owners(profile)
    if not (owners >= 0).any():
        return
    sel = np.flatnonzero((profile.category == CAT_RECOMPUTED_WEIGHTS)
                         & _in_scope(module, owners))
    module[sel] = owners[module[sel].astype(np.int64)]


def weight_gradients(profile) -> np.ndarray:
    """Allocations (indices) of backward temporaries and activations that the recomputation
    costs: made in the backward of an op that recomputed a weight (a parametrization's, the
    op that made an old-style weight), or used up there - the weight's gradient, made in
    the backward of the op that used the weight."""
    owners = scope_owners(profile)
    category = profile.category
    scoped = (owners >= 0).any()
    if not scoped and not (category == CAT_RECOMPUTED_WEIGHTS).any():
        return np.zeros(0, dtype=np.int64)     # (a model without any: no pass over events)
    memory, free_of, records = profile.memory, profile.free_of, profile.seq_records
    sizes, phases, seq = memory["size"], memory["phase"], memory["seq"]
    weights = (category == CAT_RECOMPUTED_WEIGHTS) & (sizes > 0) & (phases == PHASE_FORWARD)
    made = [records["seq"][_in_scope(records["module"], owners)]] \
        if scoped and records.size else []
    old = weights & ~_in_scope(memory["module"], owners)   # old-style: a pre-hook's
    made.append(_hook_nodes(records, seq[old], memory["thread"][old]))
    nodes = np.unique(np.concatenate(made + [seq[weights]]).astype(np.int64))
    in_node = (phases == PHASE_BACKWARD) & np.isin(seq, nodes[nodes >= 0])
    used_up = (free_of >= 0) & in_node[np.maximum(free_of, 0)]
    candidate = (sizes > 0) & (phases == PHASE_BACKWARD) \
        & np.isin(category, (CAT_ACTIVATIONS, CAT_TEMPORARIES))
    return np.flatnonzero(candidate & (in_node | used_up))


#: how far back from a weight's node its hook's own nodes are looked for
HOOK_NODES = 32


def _hook_nodes(records: np.ndarray, seqs: np.ndarray, threads: np.ndarray) -> np.ndarray:
    """The nodes an old-style pre-hook made before the weight's (`seqs`, with their threads),
    in the weight's module and call: what computes it from the parameters (spectral_norm's
    sigma = u . (W v): a view, mv, dot; weight_norm's norm), whose backward makes
    weight-sized gradients. They are the nodes just before the weight's, of its module and
    thread, back to one whose op the module's forward runs after its weight (the previous
    call's linear, where the module is called twice in a row). From the records' order:
    a node's first record is its outermost op; `seqs` holds every weight's node."""
    rec = records[records["seq"] >= 0]
    if not seqs.size or not rec.size:
        return np.zeros(0, dtype=np.int64)
    key = (rec["thread"].astype(np.int64) << 40) | rec["seq"].astype(np.int64)
    order = np.argsort(key, kind="stable")
    keys, module, op = key[order], rec["module"][order].astype(np.int64), \
        rec["op"][order].astype(np.int64)
    base = (threads.astype(np.int64) << 40) | seqs.astype(np.int64)

    def at(offset):
        """(found, module, op) of each weight's node at `offset` from its own."""
        want = base + offset
        i = np.minimum(np.searchsorted(keys, want), keys.size - 1)
        return keys[i] == want, module[i], op[i]

    found, own_module, _ = at(0)
    codes = op.max() + 1
    # the ops of the module's call after its weight: up to another module's; a walk that
    # meets the module's next weight first (called twice in a row) passed that call's hook
    # and counts for nothing
    after, alive, next_call = [], found.copy(), np.zeros(found.size, dtype=bool)
    for k in range(1, HOOK_NODES):
        hit, m, o = at(k)
        alive &= hit & (m == own_module)
        next_call |= alive & np.isin(base + k, base)
        alive &= ~next_call
        if not alive.any():
            break
        after.append((np.flatnonzero(alive), m[alive] * codes + o[alive]))
    after = np.concatenate([c[~next_call[w]] for w, c in after]) if after \
        else np.zeros(0, dtype=np.int64)
    out, alive = [], found.copy()
    for k in range(1, HOOK_NODES):
        hit, m, o = at(-k)
        alive &= hit & (m == own_module) & ~np.isin(m * codes + o, after)
        if not alive.any():
            break
        out.append(seqs[alive].astype(np.int64) - k)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
