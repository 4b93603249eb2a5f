"""Edges of the run's precision read from the first pass (record.pass_autocast): an autocast
region that runs no parameters (a softmax, a parameter-free head) keeps the run in its
weights' dtype; FSDP's root unit, wrapped around the whole model with auto-wrapped child
units, holds the parameters of the modules outside the children in one flat parameter on the
wrapped model, which counted for none: a big fp32 head beside small bf16 blocks read as a bf16
run, and a bf16 head beside fp32 blocks as fp32, 'partial' at 0 %."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import memprof

pytestmark = pytest.mark.usefixtures("collect_garbage_after")

WIDTH = 64


class SoftmaxOnly(nn.Module):
    """fp32 layers, only a parameter-free softmax under bf16 autocast."""

    def __init__(self, head=None):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))
        self.head = head

    def forward(self, x):
        h = self.body(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (self.head(h) if self.head is not None else torch.softmax(h, -1)).float()


@pytest.mark.parametrize("head", [None, nn.Softmax(-1)], ids=["function", "module"])
def test_an_autocast_that_runs_no_parameters_keeps_the_weights_dtype(head):
    """(already right before: the test keeps it so)"""
    torch.manual_seed(0)
    model = SoftmaxOnly(head)
    opt = torch.optim.AdamW(model.parameters())
    with memprof.track(model, opt, budget="t4") as prof:
        for _ in range(2):
            out = model(torch.randn(8, WIDTH))
            nn.functional.nll_loss(out.log(), torch.randint(0, 10, (8,))).backward()
            opt.step()
            opt.zero_grad()
    assert prof.meta["budget"]["precision"]["run"] == "fp32"
    record = prof.run.records["inputs"]
    assert record["autocast"] == {}
    assert record["autocast_partial"] == {"autocast": {"cpu": "bfloat16"}, "share": 0.0}


FSDP_JOB = """
import sys, torch, memprof
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 64)
    def forward(self, x):
        return torch.relu(self.fc(x))

class Net(torch.nn.Module):
    # small blocks (auto-wrapped units), a big head left in the root unit
    def __init__(self, bf16_part):
        super().__init__()
        self.blocks = torch.nn.Sequential(Block(), Block())
        self.head = torch.nn.Linear(64, 2048)
        self.bf16_part = bf16_part
    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16_part == "blocks"):
            h = self.blocks(x).float()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16_part == "head"):
            return self.head(h).float()

for part in ("blocks", "head"):
    fsdp = FSDP(Net(part), device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({Block}))
    assert sum(isinstance(m, FSDP) for m in fsdp.modules()) == 3
    opt = torch.optim.AdamW(fsdp.parameters())
    with memprof.track(fsdp, opt) as prof:
        for _ in range(2):
            fsdp(torch.randn(8, 64)).sum().backward()
            opt.step()
            opt.zero_grad()
    r = prof.run.records["inputs"]
    print(part, r.get("autocast"), r.get("autocast_partial"))
dist.destroy_process_group()
"""


def test_fsdp_root_unit_counts_the_parameters_it_holds_for_the_modules_inside(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # a file rendezvous: a free port found here could be taken before the child bound it
    store = str(tmp_path / "rendezvous")
    r = subprocess.run([sys.executable, "-c", FSDP_JOB, store], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    got = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines()[-2:])
    blocks, head = 2 * (64 * 64 + 64), 64 * 2048 + 2048
    share = round(blocks / (blocks + head), 4)
    assert got["blocks"] == "{} {'autocast': {'cpu': 'bfloat16'}, 'share': %r}" % share, got
    assert got["head"] == "{'cpu': 'bfloat16'} None", got


class OwnParameters(nn.Module):
    """Parameters of its own, functional ops; only the softmax under bf16 autocast."""

    def __init__(self, whole=False):
        super().__init__()
        self.w = nn.Parameter(torch.randn(10, WIDTH) / 8)
        self.whole = whole

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.whole):
            h = nn.functional.linear(x, self.w)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.softmax(h, -1).float()


@pytest.mark.parametrize("whole", [False, True])
def test_a_model_of_its_own_parameters_is_weighed_where_they_are_used(whole):
    """No module call holds a parameter: the pass was read by whether autocast was on at all,
    and an autocast around the softmax alone made it a bf16 run."""
    from torch.overrides import _get_current_function_mode_stack
    torch.manual_seed(0)
    model = OwnParameters(whole)
    opt = torch.optim.AdamW(model.parameters())
    with memprof.track(model, opt, budget="t4") as prof:
        for _ in range(2):
            model(torch.randn(8, WIDTH)).sum().backward()
            opt.step()
            opt.zero_grad()
            assert not any(type(m).__name__ == "_OwnUse"   # (the first pass's only)
                           for m in _get_current_function_mode_stack())
    record = prof.run.records["inputs"]
    if whole:
        assert record["autocast"] == {"cpu": "bfloat16"} and "autocast_partial" not in record
    else:
        assert record["autocast"] == {} and record["autocast_partial"]["share"] == 0.0
        assert prof.meta["budget"]["precision"]["run"] == "fp32"


def _act(x):
    return nn.functional.gelu(x) * 2


class CompiledAct(nn.Module):
    """Its own parameter only, and a torch.compile'd function in its forward."""

    def __init__(self, act):
        super().__init__()
        self.w = nn.Parameter(torch.randn(WIDTH, WIDTH) / 8)
        self.act = act

    def forward(self, x):
        return self.act(x @ self.w)


def _graphs_and_breaks(tracked: bool) -> tuple[int, int]:
    import contextlib
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = CompiledAct(torch.compile(_act, backend="eager"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt, autosave=None) if tracked else contextlib.nullcontext():
        for _ in range(3):
            model(torch.randn(4, WIDTH)).sum().backward()
            opt.step()
            opt.zero_grad()
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def test_the_first_pass_mode_leaves_a_compiled_function_in_the_forward_as_it_was():
    """The pass-through mode that weighs a model's own parameters was traced by dynamo: it broke
    the graph at threading.get_ident, and once the mode was off dynamo compiled the function
    again (3 graphs and 2 breaks where 1 and none)."""
    assert _graphs_and_breaks(tracked=True) == _graphs_and_breaks(tracked=False) == (1, 0)


class _UserMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class EntersAMode(nn.Module):
    """Its own parameter; its forward enters a mode of the user's and raises inside it."""

    def __init__(self, mode):
        super().__init__()
        self.w = nn.Parameter(torch.randn(WIDTH, WIDTH))
        self.mode = mode

    def forward(self, x):
        self.mode.__enter__()   # (left entered: the exception skips its exit)
        return x @ self.w


def test_a_raising_pass_under_a_users_mode_leaves_no_mode_of_memprofs_on_the_stack():
    """Under the user's mode at the pass's end, the mode that weighs the model's own parameters
    was left on the stack, inert: a Python call on every torch function for good."""
    from torch.overrides import _get_current_function_mode_stack as modes
    below, above = _UserMode(), _UserMode()
    model = EntersAMode(above)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with below:
        try:
            with memprof.track(model, opt, autosave=None):
                with pytest.raises(RuntimeError):
                    model(torch.randn(4, 3))   # (a shape mismatch)
            stack = modes()
        finally:
            while modes() and modes()[-1] is not below:
                torch._C._pop_torch_function_stack()
    assert [m is below or m is above or type(m).__name__ for m in stack] == [True, True]
    assert stack[0] is below and stack[1] is above
