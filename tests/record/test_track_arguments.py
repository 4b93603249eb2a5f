"""track()'s arguments a user gets wrong, checked when the block is made (one line naming
the argument), and the tracker's calls at the wrong time said as such."""
import pytest
import torch

import memprof


@pytest.mark.parametrize("kwargs, said", [
    (dict(capacity="50M"), "capacity='50M': expected a whole number of events from 1"),
    (dict(capacity=1.5), "capacity=1.5: expected a whole number of events from 1"),
    (dict(analyses=["retained_graphs"]), "analyses=['retained_graphs']: expected functions"),
    (dict(analyses="leaks"), "analyses='leaks': expected functions")])
def test_bad_arguments_are_refused_at_once(kwargs, said):
    """A list of names as analyses ran no check at all, and findings() said [] on a leak;
    capacity=1.5 was read as 1 and every event was dropped."""
    with pytest.raises((TypeError, ValueError)) as err:
        memprof.track(**kwargs)
    assert said in str(err.value) and "\n" not in str(err.value)


def test_autosave_0_is_at_the_end_only_as_for_memprof_run():
    assert memprof.track(autosave=0).autosave_s is None


def test_the_tracker_says_when_a_call_comes_at_the_wrong_time():
    model = torch.nn.Linear(4, 4)
    with memprof.track(model) as prof:
        model(torch.randn(2, 4))
        with pytest.raises(AttributeError, match="'findings': the profile is available once"):
            prof.findings                               # (read "AttributeError: findings")
    for call in (lambda: prof.log(loss=1.0), prof.step):
        with pytest.raises(RuntimeError, match=r"the track\(\) block has ended"):
            call()                                      # ('NoneType' has no attribute 'log')
    assert memprof.track(capacity=torch.tensor(5).item()).session.capacity == 5
    assert memprof.track(capacity=5e7).session.capacity == 50_000_000   # (as before)
