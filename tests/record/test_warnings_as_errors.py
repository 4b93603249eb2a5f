"""Under a filter that makes warnings errors (pytest's `-W error`, a script's
`warnings.simplefilter("error")`), memprof's own warning as the block is left (the log
filled) raised out of the block: nothing was saved and the profile had no report."""
import warnings

import torch

import memprof


def test_a_full_log_under_warnings_as_errors_keeps_the_profile(tmp_path, capfd):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.memprof"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with memprof.track(model, opt, capacity=30, path=str(path)) as prof:
            for _ in range(5):
                model(torch.randn(4, 8)).sum().backward()
                opt.step()
                opt.zero_grad()
    assert path.exists() and memprof.load(str(path)).peak == prof.peak
    assert prof.meta["dropped"] > 0
    assert "memprof dropped" in capfd.readouterr().err   # said, on stderr


def test_the_warning_is_still_a_warning_where_warnings_are_shown():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with memprof.track(capacity=10):
            for _ in range(20):
                torch.empty(64)
    assert any("dropped" in str(w.message) for w in seen)


def test_the_nested_block_warning_points_at_the_users_line():
    """The warning names the `with` line of the inner block (wrapped so that it cannot raise,
    its stack level had pointed into memprof's own track.py)."""
    outer, inner = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with memprof.track(outer):
            with memprof.track(inner):
                inner(torch.randn(2, 4))
    [w] = [w for w in seen if "inside another track block" in str(w.message)]
    assert w.filename == __file__, w.filename
