"""The dropped-events warning points at the user's `with memprof.track(...)` line: it showed
memprof's own source line (session.py) under it."""
import inspect
import warnings

import torch

import memprof


def test_the_warning_names_the_blocks_line():
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        with memprof.track(model, opt, capacity=50):
            for _ in range(5):
                model(torch.randn(4, 8)).sum().backward()
                opt.step()
                opt.zero_grad()
    (w,) = [w for w in caught if "dropped" in str(w.message)]
    assert w.category is RuntimeWarning and "raise track(capacity=...)" in str(w.message)
    assert (w.filename, w.lineno) == (__file__, line)
