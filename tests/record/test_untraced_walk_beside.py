"""The look for models beside the trained one (record.not_trained.Beside: an EMA copy in the
training loop's frame, at steps 2, 4, 8, ...) walks the frames' variables and their attributes:
under a script's own tracer (a coverage tool, a debugger) each line of that walk was the
tracer's event, as the leak walks' were (test_untraced_walk). It runs untraced too."""
import copy
import sys

import torch
import torch.nn.functional as F

import memprof
from memprof.analyse.trainable import parameters_split
from test_untraced_walk import LineTracer

D, CLASSES, STEPS = 16, 4, 4
#: the functions of the Beside look's walk of the frames' objects
WALK = {"_held", "_tensors"}


def _train():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, D, generator=g), torch.randint(0, CLASSES, (8,), generator=g))
            for _ in range(STEPS)]

    def main():
        ema = copy.deepcopy(model).requires_grad_(False)   # made in the loop: a step's look
        seen = 0
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 0.01)
            seen += 1                              # BESIDE_LINE: the loop's own line
        return ema

    with memprof.track(model, opt) as prof:
        ema = main()
    return prof, ema


def _loop_line() -> int:
    with open(__file__) as f:
        return next(i for i, line in enumerate(f, 1)
                    if line.rstrip().endswith("# BESIDE_LINE: the loop's own line"))


def test_the_look_for_models_beside_is_not_the_users_tracers_events():
    _train()                    # warm: imports, caches (not the tracer's to see)
    tracer = LineTracer()
    sys.settrace(tracer)
    try:
        prof, ema = _train()
    finally:
        sys.settrace(None)
    # the look ran (it found the EMA copy: its parameters read "not trained") ...
    split = parameters_split(prof, "end")
    ema_bytes = sum(p.numel() * p.element_size() for p in ema.parameters())
    assert split["not_trained"] == ema_bytes, split
    # ... and its walk was not the tracer's events
    assert not tracer.calls & WALK, f"the Beside look's walk was traced: {tracer.calls & WALK}"
    # the user's loop was traced at every step, also after the looks
    loop = _loop_line()
    assert tracer.hits[__file__, loop] == STEPS, tracer.hits[__file__, loop]
    assert sys.gettrace() is None
