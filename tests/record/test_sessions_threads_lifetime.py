"""One recording per process, every thread in it, one block per tracker, and a profile that is
data only (issue 15, items 2, 6 and 7)."""
import gc
import queue
import threading
import weakref

import pytest
import torch

import memprof

PHASE_BACKWARD = 2


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_a_second_thread_cannot_start_a_block_while_one_records():
    """Two blocks at once in two threads would mix one session's events into both profiles:
    the second is refused with a line naming the thread that records."""
    entered, release = threading.Event(), threading.Event()
    errors = []

    def first():
        with memprof.track():
            torch.empty(1000)
            entered.set()
            release.wait(30)

    th = threading.Thread(target=first, name="trainer-A")
    th.start()
    assert entered.wait(30)
    try:
        with pytest.raises(RuntimeError, match="trainer-A") as err:
            with memprof.track(_model()):
                pass
        errors.append(str(err.value))
    finally:
        release.set()
        th.join(30)
    assert "\n" not in errors[0] and "MainThread" in errors[0]
    with memprof.track() as prof:   # once the other block ended, this thread may record
        keep = torch.empty(12_345, dtype=torch.uint8)
    assert 12_345 in prof.memory["size"].tolist()
    del keep


def test_backward_on_a_thread_that_existed_before_the_block_is_recorded():
    model = _model()
    jobs, done = queue.Queue(), queue.Queue()

    def worker():   # a long-lived worker (thread pool), started before track()
        for job in iter(jobs.get, None):
            job()
            done.put(True)

    th = threading.Thread(target=worker, name="backward-worker")
    th.start()
    try:
        with memprof.track(model) as prof:
            loss = model(torch.randn(32, 64)).sum()
            jobs.put(loss.backward)
            assert done.get(timeout=60)
    finally:
        jobs.put(None)
        th.join(30)
    mem = prof.memory
    backward = mem[(mem["phase"] == PHASE_BACKWARD) & (mem["size"] > 0)]
    assert backward.size > 0
    assert prof.breakdown("category", at="end")["gradients"] == _param_bytes(model)


def test_reusing_a_tracker_is_refused_or_categorised_correctly():
    """One Tracker entered twice: either its second profile is right, or a clear error."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    tracker = memprof.track(model, opt)
    cats = []
    for _ in range(2):
        try:
            with tracker as prof:
                for _ in range(2):
                    model(torch.randn(32, 64)).sum().backward()
                    opt.step()
                    opt.zero_grad()
                model(torch.randn(32, 64)).sum().backward()
        except RuntimeError as err:
            assert "already recorded" in str(err) and "memprof.track(" in str(err)
            break
        cats.append(prof.breakdown("category", at="end"))
    for c in cats:
        assert c["gradients"] == _param_bytes(model) and c["other"] == 0, c


def test_torch_profiler_inside_a_block_gets_a_memprof_error():
    with memprof.track():
        with pytest.raises(RuntimeError, match="memprof"):
            with torch.profiler.profile(profile_memory=True):
                torch.empty(100)
    with torch.profiler.profile(profile_memory=True):   # fine after the block
        torch.empty(100)


def test_holding_the_profile_does_not_keep_the_model_or_optimizer_alive():
    def run():
        model = _model()
        opt = torch.optim.AdamW(model.parameters())
        with memprof.track(model, opt) as prof:
            model(torch.randn(8, 64)).sum().backward()
            opt.step()
        return prof, weakref.ref(model), weakref.ref(opt)

    prof, model, opt = run()
    gc.collect()
    assert model() is None and opt() is None
    assert prof.peak > 0 and prof.breakdown("category")["parameters"] > 0


def test_every_thread_keeps_every_event_past_its_first_log_chunk():
    """A thread's log grows in chunks; the first of another thread's log takes small pages and
    the rest huge ones, the starting thread's all huge (csrc/tracker.cpp, RecordLog): events
    on both sides of every chunk boundary, in both kinds of log, are kept in order."""
    from memprof import _C
    n = 40_000   # 80,000 events per thread: over two chunks of 29,126 records
    sizes = (24, 40)

    def work(nbytes):
        for _ in range(n):
            torch.empty(nbytes, dtype=torch.uint8)

    with memprof.track() as prof:
        worker = threading.Thread(target=work, args=(sizes[1],))
        worker.start()
        work(sizes[0])
        worker.join()
    assert _C.counters()["dropped"] == 0
    mem = prof.memory
    for nbytes in sizes:
        mine = mem[abs(mem["size"]) == nbytes]
        assert len(set(mine["thread"].tolist())) == 1
        assert (mine["size"] > 0).sum() == n and (mine["size"] < 0).sum() == n
        assert (mine["size"][0::2] > 0).all() and (mine["size"][1::2] < 0).all()
        assert (mine["ptr"][0::2] == mine["ptr"][1::2]).all()   # each free follows its allocation
        assert (mine["t_ns"][1:] >= mine["t_ns"][:-1]).all()
