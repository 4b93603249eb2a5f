"""A user module first imported inside a block (imported lazily in the training loop) that
binds torch's functions by name - `from torch.autograd import grad` - kept memprof's wrapper
after the block: only torch's own modules imported meanwhile got the originals back, so the
name called memprof's wrapper for the rest of the process, and its closure held the session
(and the run's model and data). And a wrapper of memprof's wrapper made by another library
(functools.wraps) kept it too; the wrappers now hold their session weakly and pass through
once their block ended, and such a wrapper's `__wrapped__` names torch's function again."""
import subprocess
import sys
import textwrap

LAZY = '''
import functools
import torch
from torch.autograd import grad, backward
from torch.nn.utils import clip_grad_norm_
TABLE = {"grad": grad}   # (a user's data: left as it is, the wrapper in it inert)


def _logged(inner):   # another library's wrapper of whatever stood there, in its closure
    @functools.wraps(inner)
    def logged_grad(*args, **kwargs):
        return inner(*args, **kwargs)
    return logged_grad


logged_grad = _logged(torch.autograd.grad)
'''

SCRIPT = '''
import gc, sys, weakref
import torch
import memprof
model = torch.nn.Linear(8, 2)
tracker = memprof.track(model, health=True)   # no optimizer: torch.autograd.grad is watched
session = weakref.ref(tracker.session)
real = torch.autograd.grad, torch.autograd.backward, torch.nn.utils.clip_grad_norm_
with tracker:
    for _ in range(3):   # a functional loop: gradients by grad, updated by hand
        import lazy_steps   # first imported here, in the loop
        loss = model(torch.randn(4, 8)).pow(2).mean()
        grads = lazy_steps.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p.sub_(0.1 * g)
assert len(tracker.profile.steps) == 3
del tracker
gc.collect()
print("names", (lazy_steps.grad, lazy_steps.backward, lazy_steps.clip_grad_norm_) == real)
print("chained", lazy_steps.logged_grad.__wrapped__ is real[0])
print("session freed", session() is None)
print("still works", *(len(through(model(torch.randn(4, 8)).pow(2).mean(),
                                   list(model.parameters())))
                       for through in (lazy_steps.logged_grad, lazy_steps.TABLE["grad"])))
'''


def test_names_bound_in_a_module_imported_in_the_block_get_torchs_functions(tmp_path):
    (tmp_path / "lazy_steps.py").write_text(textwrap.dedent(LAZY))
    (tmp_path / "s.py").write_text(textwrap.dedent(SCRIPT))
    r = subprocess.run([sys.executable, "s.py"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["names True", "chained True", "session freed True",
                                     "still works 2 2"], r.stdout
