"""Allocations of a thread that runs no module take no phase of the training thread: a
logger or prefetch thread allocating while the model runs its forward made "activations"
(3 MiB, three quarters of the peak, in a new user's run); the report names the threads when
more than one holds memory at the peak."""
import threading

import torch

import memprof
from memprof.record.events import PHASES


def test_a_background_threads_blocks_are_not_activations():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kept, stop = [], threading.Event()
    in_forward, allocated = threading.Event(), threading.Event()

    def background():
        in_forward.wait(30)
        kept.append(torch.empty(1 << 18))     # 1 MiB, made while the main thread is in forward
        allocated.set()
        stop.wait(30)

    class WaitInForward(torch.nn.Module):
        def forward(self, x):
            in_forward.set()
            allocated.wait(30)
            return x

    net = torch.nn.Sequential(WaitInForward(), model)
    worker = threading.Thread(target=background)
    worker.start()
    try:
        with memprof.track(net, opt) as prof:
            for _ in range(3):
                net(torch.randn(16, 32)).square().mean().backward()
                opt.step()
                opt.zero_grad()
    finally:
        stop.set()
        worker.join()
    p = prof.profile
    m = p.memory
    big = (m["size"] == 1 << 20)
    assert big.sum() == 1
    assert PHASES[int(m["phase"][big][0])] == "other"
    assert p.breakdown("category", at="end")["activations"] < 1 << 20
    threads = p.breakdown("thread", at="end")
    assert threads[f"thread {int(m['thread'][big][0])}"] >= 1 << 20
    assert p.model_thread is not None and p.model_thread != int(m["thread"][big][0])


def test_one_thread_shows_no_thread_table(capsys):
    """Blocks from before tracking are not a second thread: the table showed in every
    report of a model built before its block."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt) as prof:
        for _ in range(2):
            model(torch.randn(8, 16)).sum().backward()
            opt.step()
    assert "before tracking" in prof.breakdown("thread")
    prof.report()
    assert "by thread" not in capsys.readouterr().out
