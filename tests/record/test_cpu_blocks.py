"""CPU blocks are recorded by memprof's wrapper around the CPU allocator, with sizes it notes
itself (csrc/cpu_blocks.h): PyTorch's CPU allocator is told not to report (its size map, a
process-wide lock and a hash node per block, cost a quarter of the hook points' instructions
on an op-bound step). What its reports gave must hold: every free with its size, on any
thread, in a later session too, oneDNN's scratch memory, the running total. (Blocks taken
from PyTorch's default allocator without the wrapper are still its own reports, to the
freeing thread's hook: one freed on a thread that existed before the block and never ran an
op there is not seen, as before.)"""
import gc
import threading

import numpy as np
import pytest
import torch

import memprof


def _cpu(prof):
    mem = prof.memory
    return mem[(mem["thread"] >= 0) & (mem["device_type"] == 0)]


def test_the_running_total_moves_by_each_blocks_size():
    gc.collect()
    with memprof.track() as prof:
        a = torch.empty(12_345, dtype=torch.uint8)
        b = torch.empty(4_000, dtype=torch.uint8)
        del a
        del b
    mem = _cpu(prof)
    sizes = mem["size"].tolist()
    i, j, k = sizes.index(12_345), sizes.index(4_000), sizes.index(-12_345)
    totals = mem["total_allocated"]
    assert totals[j] - totals[i] == 4_000
    assert totals[k] == totals[j] - 12_345
    assert mem["ptr"][i] == mem["ptr"][k]


def test_a_block_of_one_session_freed_in_the_next_is_recorded_with_its_size():
    with memprof.track():
        kept = torch.empty(7_777, dtype=torch.uint8)
    ptr = kept.data_ptr()
    with memprof.track() as prof:
        del kept
    mem = _cpu(prof)
    assert -7_777 in mem["size"].tolist()
    assert mem["ptr"][mem["size"].tolist().index(-7_777)] == ptr


def test_a_free_on_a_thread_that_never_ran_an_op_is_recorded():
    box = {}
    with memprof.track() as prof:
        box["t"] = torch.empty(9_999, dtype=torch.uint8)
        worker = threading.Thread(target=box.clear)   # drops the last reference: frees there
        worker.start()
        worker.join()
    mem = _cpu(prof)
    sizes = mem["size"].tolist()
    assert 9_999 in sizes and -9_999 in sizes
    assert mem["thread"][sizes.index(-9_999)] != mem["thread"][sizes.index(9_999)]


def test_onednn_scratch_memory_is_freed_in_the_log():
    """oneDNN's LSTM takes scratch memory through raw_allocate / raw_deallocate (the block
    drops the deleter the wrapper gave it): its frees were missing, and a correct loop read
    as a growing leak."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(16, 16)
    x = torch.randn(5, 3, 16)
    gc.collect()
    with memprof.track(lstm) as prof:
        for _ in range(3):
            out, state = lstm(x)
            out.sum().backward()
            lstm.zero_grad(set_to_none=True)
            del out, state
    mem = _cpu(prof)
    live = {}
    for ptr, size in zip(mem["ptr"].tolist(), mem["size"].tolist()):
        if size > 0:
            live[ptr] = size
        else:
            live.pop(ptr, None)
    assert sum(live.values()) == 0, live   # every block made in the block was freed in it
    assert not [f for f in memprof.findings(prof) if f.kind == "memory_growth"]


def test_the_total_after_the_block_counts_what_is_still_alive():
    gc.collect()
    with memprof.track() as prof:
        kept = [torch.empty(1_000, dtype=torch.uint8) for _ in range(4)]
        torch.empty(50_000, dtype=torch.uint8)   # freed at once
    mem = _cpu(prof)
    start = mem["total_allocated"][0] - mem["size"][0]
    assert mem["total_allocated"][-1] - start == 4_000
    assert len(kept) == 4


def test_storages_made_without_the_cpu_allocator_wrapper_are_recorded():
    """torch.UntypedStorage(n) takes PyTorch's default CPU allocator directly, not the current
    one memprof wraps: copy.deepcopy of a state dict, torch.load. Those blocks are still the
    CPU allocator's reports, and were lost when it was told to report nothing."""
    import copy
    import io
    model = torch.nn.Linear(64, 32)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    gc.collect()
    with memprof.track() as prof:
        best = copy.deepcopy(model.state_dict())
        buffer.seek(0)
        loaded = torch.load(buffer)
        del best
    sizes = _cpu(prof)["size"].tolist()
    weight = 64 * 32 * 4
    assert sizes.count(weight) >= 2      # the deep copy's and the loaded one's
    assert -weight in sizes              # the copy's free, with its size
    assert loaded["weight"].shape == (32, 64)
    totals = _cpu(prof)["total_allocated"]
    assert totals[sizes.index(-weight)] < totals[sizes.index(-weight) - 1]


def test_a_reported_block_of_the_last_session_freed_in_this_one():
    """A block PyTorch's allocator reported (a deep copy) in one session and freed in the
    next: the free is recorded with its size; the total, which forgot the last session's
    reported blocks when this one started, does not go below what it counted."""
    import copy
    model = torch.nn.Linear(500, 500)
    with memprof.track():
        state = copy.deepcopy(model.state_dict())
    with memprof.track() as prof:
        first = torch.empty(64, dtype=torch.uint8)
        del state
    mem = _cpu(prof)
    sizes = mem["size"].tolist()
    i = sizes.index(-500 * 500 * 4)
    assert sizes.index(64) < i
    assert mem["total_allocated"][i] == mem["total_allocated"][i - 1]
    assert first.numel() == 64


def test_reported_blocks_freed_between_sessions_do_not_pile_up_in_the_total():
    """A deep copy made in a block and freed after it: PyTorch's allocator reports nothing
    then, and its size stayed in the total for good, +4 MB per session."""
    import copy
    model = torch.nn.Linear(1000, 1000)
    firsts = []
    for _ in range(3):
        gc.collect()
        with memprof.track() as prof:
            state = copy.deepcopy(model.state_dict())
        mem = _cpu(prof)
        firsts.append(int(mem["total_allocated"][mem["size"].tolist().index(4_000_000)]))
        del state
        gc.collect()
    assert firsts[1] == firsts[2], firsts
    assert firsts[2] < 2 * 4_000_000, firsts


def test_blocks_made_and_freed_by_many_threads_at_once_keep_the_total():
    """Sizes are noted in one table that grows as blocks stay alive: four threads make 1,600
    blocks at once (more than the table first holds; ops run without the GIL, and logsumexp's
    temporaries are noted and taken inside the op), other threads free them. Every free is
    recorded with its block's size, and the next session's total starts where this one did."""
    x = torch.randn(64, 64)
    barrier = threading.Barrier(4)
    kept = [[] for _ in range(4)]

    def make(blocks, first):
        barrier.wait()
        for i in range(400):
            blocks.append(torch.empty(first + i, dtype=torch.uint8))
            torch.logsumexp(x, 0)

    gc.collect()
    with memprof.track() as prof:
        marker = torch.empty(111, dtype=torch.uint8)
        threads = [threading.Thread(target=make, args=(kept[t], 10_000 * (t + 1)))
                   for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        freers = [threading.Thread(target=blocks.clear) for blocks in kept[::-1]]
        for t in freers:
            t.start()
        for t in freers:
            t.join()
        del marker
    mem = _cpu(prof)
    start = int(mem["total_allocated"][0] - mem["size"][0])
    live = {}
    for ptr, size in zip(mem["ptr"].tolist(), mem["size"].tolist()):
        if size > 0:
            live[ptr] = size
        elif ptr in live:
            assert live.pop(ptr) == -size
    assert not live
    made = {10_000 * (t + 1) + i for t in range(4) for i in range(400)}
    assert sum(1 for s in mem["size"].tolist() if s in made) == 1_600
    with memprof.track() as prof:
        probe = torch.empty(222, dtype=torch.uint8)
    mem = _cpu(prof)
    assert int(mem["total_allocated"][0] - mem["size"][0]) == start
    assert probe.numel() == 222


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_onednn_memory_freed_under_torch_profiler_after_a_session_is_reported_to_it():
    """oneDNN's memory (raw_allocate, freed through the wrapper's raw_deleter) made and freed
    while torch.profiler records, after a memprof session ended: torch.profiler sees its free,
    as it does where memprof never ran. (The free went to free_cpu directly, around the
    allocator's deleter that reports it, because the last session took its blocks from
    alloc_cpu; torch.profiler then read oneDNN's tensors as never freed.)"""
    x = torch.randn(500, 500)
    with memprof.track():
        (x * 2).sum()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as later:
        y = x.to_mkldnn()
        del y
        gc.collect()
    frees = [e for e in later.events()
             if e.name == "[memory]" and e.cpu_memory_usage == -x.nbytes]
    assert len(frees) == 1, frees
