"""An autosave of a loop keeping an EMA as a list of tensors, started after a warm-up: the list
first reads "not trained" as the profile so far is made, and is named then. The names of the
profile are taken after that (Session.so_far), so the file a crashed run leaves behind loads."""
import pytest
import torch

import memprof
from memprof.profile import Profile
from memprof.run import Run

pytestmark = pytest.mark.usefixtures("collect_garbage_after")


def test_a_profile_so_far_with_a_kept_list_first_changed_loads(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = [p.detach().clone() for p in model.parameters()]
    with memprof.track(model, opt, autosave=None) as prof:
        for step in range(4):
            model(torch.randn(8, 16)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if step >= 2:   # the EMA starts after a warm-up
                torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 0.1)
            if step == 2:
                profile = Profile(Run.from_session(prof.session.so_far()))
                path = str(tmp_path / "so_far.memprof")
                profile.save(path)
    names = profile.run.modules
    assert max(m for s in profile.run.snapshots for m in s.modules) < len(names)
    assert "ema" in names
    memprof.load(path)   # ProfileFormatError: a module id outside the modules, before
    final = prof.profile   # the block's end: its names taken after its last notes
    assert max(m for s in final.run.snapshots for m in s.modules) < len(final.run.modules)
