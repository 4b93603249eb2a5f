"""Module buffers - BatchNorm statistics, position ids, a sinusoidal positional table, a rotary
cache rebuilt for a longer sequence - are the category `buffers`, owned by the module that
registered them; buffers that existed before tracking are counted - every one torch.profiler
counts, and those no op reads, which it cannot see (issue 14)."""
import math

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action

import memprof
from memprof.record.events import CAT_BUFFERS

D, L = 16, 64


class Rotary(torch.nn.Module):
    """A rotary table cached as a buffer and rebuilt when a longer sequence arrives."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, D, 2) / D),
                             persistent=False)
        self.register_buffer("cos_cached", torch.zeros(0, D), persistent=False)

    def forward(self, x):
        n = x.shape[1]
        if self.cos_cached.shape[0] < n:
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq)
            self.cos_cached = torch.cat([freqs, freqs], dim=-1).cos()
        return x * self.cos_cached[:n]


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, D)
        self.register_buffer("position_ids", torch.arange(L).expand(1, -1), persistent=False)
        pe = torch.zeros(L, D)
        pos = torch.arange(L).unsqueeze(1)
        div = torch.exp(torch.arange(0, D, 2) * (-math.log(10000.0) / D))
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe)
        self.rotary = Rotary()
        self.norm = torch.nn.BatchNorm1d(D)
        self.out = torch.nn.Linear(D, 2)

    def forward(self, tokens):
        n = tokens.shape[1]
        h = self.embed(tokens) + self.pe[self.position_ids[:, :n]]
        h = self.rotary(h)
        return self.out(self.norm(h.mean(1)))


def storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def train(model, lengths, track):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with track as prof:
        for n in lengths:
            model(torch.randint(0, 100, (4, n))).square().mean().backward()
            opt.step()
            opt.zero_grad()
    return prof


def buffer_bytes_by_module(prof, at):
    alive = prof.alive_at(at)
    out: dict[str, int] = {}
    for i in alive[prof.category[alive] == CAT_BUFFERS]:
        name = prof.module_name(int(prof.event_module[i]))
        out[name] = out.get(name, 0) + int(prof.memory["size"][i])
    return out


def test_buffers_are_their_own_category_owned_by_their_module():
    torch.manual_seed(0)
    model = Encoder()
    prof = train(model, [8, 8, 32, 32], memprof.track(model))
    per_module = {"Encoder": sum(storages([model.position_ids, model.pe]).values()),
                  "rotary": sum(storages(model.rotary.buffers()).values()),
                  "norm": sum(storages(model.norm.buffers()).values())}
    assert buffer_bytes_by_module(prof, "end") == per_module
    assert prof.breakdown("category", at="end")["buffers"] == sum(per_module.values())
    # the rotary cache of the short sequences, replaced at step 2, was a buffer too
    short = 8 * D * 4
    assert buffer_bytes_by_module(prof, 1)["rotary"] == short + model.rotary.inv_freq.nbytes
    first = [i for i in np.flatnonzero((prof.memory["size"] == short)
                                       & (prof.category == CAT_BUFFERS))
             if prof.module_name(int(prof.event_module[i])) == "rotary"]
    assert len(first) == 1 and prof.free_of[first[0]] >= 0       # ... freed when rebuilt


def test_a_model_built_inside_the_block_gets_its_buffers_too():
    torch.manual_seed(0)
    with memprof.track(auto_modules=True) as prof:
        model = Encoder()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            model(torch.randint(0, 100, (4, 8))).square().mean().backward()
            opt.step()
    expected = sum(storages(model.buffers()).values())
    assert prof.breakdown("category", at="end")["buffers"] == expected
    assert buffer_bytes_by_module(prof, "end")["norm"] == sum(
        storages(model.norm.buffers()).values())


def test_track_sees_the_buffers_torch_profiler_counts():
    torch.manual_seed(0)
    model = Encoder()
    model(torch.randint(0, 100, (4, 32)))              # the rotary cache exists before both
    buffers = storages(model.buffers())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as tp:
        for _ in range(2):
            model(torch.randint(0, 100, (4, 8))).square().mean().backward()
            opt.step()
            opt.zero_grad()
    # (the timeline's keys are tensor keys, with a storage, and others: which others appear
    # depends on what the process ran before, e.g. tests/analyse collected first)
    seen_by_torch = {key.storage.ptr: size for _, action, (key, _), size
                     in tp._memory_profile().timeline if action == Action.PREEXISTING
                     and hasattr(key, "storage") and key.storage.ptr in buffers}
    # torch.profiler counts the buffers ops read; inv_freq, unused once the cache is long
    # enough, it cannot see
    unused = storages([model.rotary.inv_freq])
    assert seen_by_torch == {p: b for p, b in buffers.items() if p not in unused}

    prof = train(model, [8, 8], memprof.track(model))
    alive = prof.alive_at("end")
    mine = alive[prof.category[alive] == CAT_BUFFERS]
    seen_by_memprof = {int(prof.memory["ptr"][i]): int(prof.memory["size"][i]) for i in mine}
    assert seen_by_torch.items() <= seen_by_memprof.items()
    assert seen_by_memprof == buffers


def test_unchanged_buffers_are_noted_again_only_at_the_end():
    """Buffers that existed before tracking and never change: no note at the step ends (the
    baseline names them), one at the end."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt) as prof:
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
    assert len(prof.markers("step")) == 3
    assert [s.category for s in prof.run.snapshots].count(CAT_BUFFERS) == 2   # baseline, end


def _steps(model, opt, n, between=None):
    for i in range(n):
        if between is not None:
            between(i)
        model(torch.randn(2, 4, dtype=next(model.parameters()).dtype)).sum().backward()
        opt.step()
        opt.zero_grad()


def _buffer_notes_at(prof) -> list[int]:
    """The step (the number of step markers before it) at which each buffer note was taken."""
    steps = prof.marker_positions("step")
    notes = [m["position"] for m in prof.markers("snapshot") if m["value"] == CAT_BUFFERS]
    return [int(np.searchsorted(steps, p, side="right")) for p in notes]


def test_buffers_unchanged_for_many_steps_are_looked_at_ever_less_often(monkeypatch):
    """A step end's look at the buffers cost ~20 us on a big step (its objects had left the
    caches): steps go by between looks while nothing changes, and the buffers that do change
    without saying so (a storage swapped through .data) are still noted, at the next look,
    while they are alive."""
    from memprof.record.snapshots import MAX_LOOK_GAP, SnapshotRecorder
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    looks, note_buffers = [], SnapshotRecorder.note_buffers

    def counted(self, force=False):
        if not force:   # (the end's note is forced)
            looks.append(self.session.steps.step)
        return note_buffers(self, force)
    monkeypatch.setattr(SnapshotRecorder, "note_buffers", counted)

    def swap(i):
        if i == 40:   # no hook sees this: a new storage under the same tensor
            model[1].running_var.data = torch.full((4,), 2.0)
    with memprof.track(model, opt) as prof:
        _steps(model, opt, 70, swap)
    # the gap doubles up to MAX_LOOK_GAP; the look at 63 finds the swap: every step again
    assert MAX_LOOK_GAP == 32 and looks == [1, 3, 7, 15, 31, 63, 64, 66, 70], looks
    assert 63 in _buffer_notes_at(prof)
    swapped = model[1].running_var.untyped_storage().data_ptr()
    alive = prof.alive_at("end")
    at = alive[prof.memory["ptr"][alive] == swapped]
    assert len(at) == 1 and prof.category[at[0]] == CAT_BUFFERS
    assert prof.module_name(int(prof.event_module[at[0]])) == "Sequential.1"


def test_buffers_set_or_converted_are_noted_at_that_step_end():
    """register_buffer / a buffer assigned, and Module._apply (model.double()), which writes
    the buffer dicts itself: noted at the end of the step they happen in, however long the
    buffers had stayed the same."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def change(i):
        if i == 20:
            model[1].running_mean = torch.zeros(4)          # assigned (register_buffer)
        if i == 45:
            model.double()                                  # Module._apply

    with memprof.track(model, opt) as prof:
        _steps(model, opt, 50, change)
    noted = _buffer_notes_at(prof)
    assert 21 in noted and 46 in noted, noted   # the ends of steps 20 and 45 (no look due)
    alive = prof.alive_at("end")
    for b in model[1].buffers():
        if b.untyped_storage().nbytes():
            at = alive[prof.memory["ptr"][alive] == b.untyped_storage().data_ptr()]
            assert len(at) == 1 and prof.category[at[0]] == CAT_BUFFERS
