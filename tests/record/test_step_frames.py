"""The Python frames memprof runs in each training step (issue 16). On an op-bound step its
Python hooks are the larger part of its own cost, and each frame runs cold (the step's kernels
evicted it): this counts them, as sys.setprofile sees them, so that a change that adds frames
to the per-step path is seen here, not found months later as a slower benchmark."""

import collections
import os
import sys

import pytest
import torch

import memprof
from tiny_mlp import MLP

pytestmark = pytest.mark.usefixtures("collect_garbage_after")

#: memprof's Python frames in one step of the loop below, measured (see the test)
BUDGET = 46


class Sequential3(torch.nn.Module):
    """Three blocks of MLP: nine submodule calls a step, as the benchmark MLP's twin has."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([MLP(8, 16, 8) for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _frames_per_step(steps: int = 12, warm: int = 9):
    """memprof's frames (and the dynamo checks they call) in each of `steps` steps after
    `warm` untimed ones, the leak probe's looks (ends of steps 2, 4, 8, 16) left out."""
    torch.manual_seed(0)
    model = Sequential3()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    dynamo_check = torch.compiler.is_dynamo_compiling.__code__
    per_step, count = [], collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            if code is dynamo_check or frame.f_globals.get("__name__", "").startswith("memprof"):
                count[f"{os.path.basename(code.co_filename)}:{code.co_name}"] += 1

    def step():
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with memprof.track(model, opt, health=False):
        for _ in range(warm):
            step()
        for i in range(steps):
            count.clear()
            sys.setprofile(profile)
            try:
                step()
            finally:
                sys.setprofile(None)
            if warm + i + 1 != 16:   # the leak probe looks at the end of step 16
                per_step.append(dict(count))
    return per_step


def test_memprof_runs_few_python_frames_per_step():
    per_step = _frames_per_step()
    totals = sorted(sum(c.values()) for c in per_step)
    median = totals[len(totals) // 2]   # (a look at unchanged optimizer state: 4 more)
    # measured: 60 before the per-step path lost its wrappers (outside_dynamo now in C, the
    # graph-break check, the own-call check, the thread number, the look's due, the
    # optimizer's label read inline, no Snapshot object per note); 46 after
    assert median <= BUDGET, sorted(per_step[0].items(), key=lambda kv: -kv[1])


@pytest.fixture
def frame_callback():
    """A stand-in for dynamo's callback (get, set) given to memprof._C, dynamo's own put back
    after the test."""
    from memprof import _C
    from memprof.record import module_call
    state = {"callback": "compiling", "sets": []}

    def set_callback(value):
        state["sets"].append(value)
        if value == "compiling" and state.get("fail_restore"):
            raise RuntimeError("restore failed")
        state["callback"] = value
    _C.set_frame_callback(lambda: state["callback"], set_callback)
    yield state
    import torch._dynamo  # noqa: F401  (loaded: skip_own_frame gives memprof its functions)
    module_call.skip_own_frame()


def test_outside_dynamo_turns_the_callback_off_while_it_runs(frame_callback):
    """memprof's own bookkeeping runs with dynamo's frame callback off (it is C now: the
    Python function was a frame a call), and the callback is back after, also when the
    bookkeeping raised; without a callback nothing is set at all."""
    from memprof import _C
    seen = []
    assert _C.outside_dynamo(lambda a, b: seen.append(frame_callback["callback"]) or a + b,
                             2, 3) == 5
    assert seen == [None] and frame_callback["callback"] == "compiling"

    def fails():
        raise ValueError("bookkeeping failed")
    with pytest.raises(ValueError, match="bookkeeping failed"):
        _C.outside_dynamo(fails)
    assert frame_callback["callback"] == "compiling"
    frame_callback["sets"].clear()
    frame_callback["callback"] = None
    assert _C.outside_dynamo(len, [1, 2]) == 2 and frame_callback["sets"] == []
    # a failure to put the callback back is raised, with the bookkeeping's error as context
    frame_callback["callback"], frame_callback["fail_restore"] = "compiling", True
    with pytest.raises(RuntimeError, match="restore failed") as err:
        _C.outside_dynamo(fails)
    assert isinstance(err.value.__context__, ValueError)
    with pytest.raises(TypeError, match="expected the function"):
        _C.outside_dynamo()
