"""`_C.events(since=...)`: a reader that follows the log while it grows gets only what is new."""
from __future__ import annotations

import threading

import numpy as np
import torch

import memprof
from memprof import _C
from memprof.record.events import EVENT_DTYPE


def test_events_since_returns_each_threads_records_after_its_cursor():
    with memprof.track():
        a = [torch.empty(100 + i) for i in range(5)]
        whole = np.frombuffer(_C.events(), dtype=EVENT_DTYPE)
        cursors = np.bincount(whole["thread"]).tolist()
        assert np.frombuffer(_C.events(cursors), dtype=EVENT_DTYPE).size == 0
        b = [torch.empty(7000 + i) for i in range(3)]
        worker = threading.Thread(target=lambda: torch.empty(9000))
        worker.start()
        worker.join()
        new = np.frombuffer(_C.events(cursors), dtype=EVENT_DTYPE)
        full = np.frombuffer(_C.events(), dtype=EVENT_DTYPE)
    # the new part is exactly the tail of each thread's log beyond its cursor
    expect = np.concatenate([full[full["thread"] == t][cursors[t] if t < len(cursors) else 0:]
                             for t in np.unique(full["thread"])])
    assert new.tobytes() == expect.tobytes()
    sizes = set(new["size"][new["size"] > 0].tolist())
    assert {(7000 + i) * 4 for i in range(3)} <= sizes and 9000 * 4 in sizes
    assert not sizes & {(100 + i) * 4 for i in range(5)}
    del a, b
