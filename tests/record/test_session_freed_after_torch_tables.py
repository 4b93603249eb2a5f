"""Nothing of a track() session outlives its block through torch's cached tables of functions:
dynamo's handlers and rule map, torch.overrides' lists, built on first use - here by a
torch.compile inside the block - named memprof's torch.autograd.grad wrapper (a loop without
an optimizer) and its torch.compile wrapper where torch's functions stood. The grad wrapper's
closure held the session, and the run's model and data with it, for the rest of the process;
and after the block dynamo had no handler for the real torch.autograd.grad. Dynamo imported
for the first time in the block bound memprof's collectives wrappers in its tables too."""
import subprocess
import sys
import textwrap

SCRIPT = '''
import gc, sys, weakref
import torch
import memprof
if sys.argv[1] == "before":   # a script that compiled something before the block
    import torch._dynamo

model = torch.nn.Linear(8, 2)
tracker = memprof.track(model)   # no optimizer: torch.autograd.grad is watched
session = weakref.ref(tracker.session)
with tracker:
    if sys.argv[1] == "inside":
        import torch._dynamo
    scaled = torch.compile(lambda x: torch.sin(x) * 2, backend="eager")
    scaled(torch.randn(3))
    for _ in range(3):   # a functional loop: gradients by torch.autograd.grad, updated by hand
        loss = model(torch.randn(4, 8)).pow(2).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p.sub_(0.1 * g)
assert len(tracker.profile.steps) == 3
gc.collect()
from torch._dynamo.variables.torch import TorchInGraphFunctionVariable
from torch._dynamo.trace_rules import get_torch_obj_rule_map
handlers = TorchInGraphFunctionVariable._get_handlers()
print("session freed", session() is None)
print("torch's functions in dynamo's tables", torch.autograd.grad in handlers,
      torch.compile in handlers, torch.autograd.grad in get_torch_obj_rule_map())
collectives = sys.modules.get("torch.distributed._functional_collectives")   # (imported by
print("dynamo's collectives", collectives is None or (   # dynamo, in the block: bound ours)
      collectives.legacy_allreduce is torch.distributed.all_reduce and
      torch.distributed.all_reduce in collectives.traceable_collective_remaps))
print("memprof's", [f.__module__ for f in list(handlers) +
                    list(get_torch_obj_rule_map())
                    if "memprof" in (getattr(f, "__module__", None) or "")])
'''


def test_the_session_is_freed_when_dynamo_built_its_tables_in_the_block(tmp_path):
    (tmp_path / "s.py").write_text(textwrap.dedent(SCRIPT))
    for dynamo in ("before", "inside"):   # imported before the block, or first in it
        r = subprocess.run([sys.executable, "s.py", dynamo], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == ["session freed True",
                                         "torch's functions in dynamo's tables True True True",
                                         "dynamo's collectives True", "memprof's []"], (dynamo, r.stdout)
