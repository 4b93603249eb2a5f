"""Autocast that a forward enters around part of itself only. memprof took the first autocast
entered during the first forward pass as the run's precision: a model that runs one small
head under bf16 read as a bf16 run (against a T4: 'no bf16', and "what would fit"
re-estimated the whole model in fp16), and one whose forward runs under an autocast it then
switches off for its whole body read as bf16 too. The run's precision is now the autocast
that ran at least half of the parameters the first pass used; less is recorded as partial
(the run keeps its weights' dtype) with an info finding that says so."""
import pytest
import torch
from torch import nn

import memprof

pytestmark = pytest.mark.usefixtures("collect_garbage_after")

WIDTH = 128


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH),
                                  nn.ReLU(), nn.Linear(WIDTH, WIDTH))
        self.head = nn.Linear(WIDTH, 10)


class SmallPartInBf16(Body):
    """The body in fp32, only the small head under bf16 autocast."""

    def forward(self, x):
        h = self.body(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.head(h).float()


class OnThenOffForTheBody(Body):
    """Autocast entered, then switched off for the whole body (numerically sensitive)."""

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.autocast("cpu", enabled=False):
                h = self.body(x)
            return self.head(h).float()


class AllButSoftmax(Body):
    """The whole forward under bf16, softmax switched back to fp32: a bf16 run."""

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.body(x)
            with torch.autocast("cpu", enabled=False):
                h = torch.softmax(h.float(), dim=-1)
            return self.head(h).float()


class OffOnly(Body):
    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            return self.head(self.body(x))


def _run(model, steps=2):
    opt = torch.optim.AdamW(model.parameters())
    with memprof.track(model, opt, budget="t4") as prof:
        for _ in range(steps):
            out = model(torch.randn(16, WIDTH))
            nn.functional.cross_entropy(out, torch.randint(0, 10, (16,))).backward()
            opt.step()
            opt.zero_grad()
    return prof


def _partial_findings(prof):
    return [f for f in prof.findings if f.kind == "partial_autocast"]


@pytest.mark.parametrize("cls", [SmallPartInBf16, OnThenOffForTheBody])
def test_autocast_over_a_small_part_keeps_the_runs_dtype_and_says_so(cls):
    torch.manual_seed(0)
    prof = _run(cls())
    precision = prof.meta["budget"]["precision"]
    assert precision["run"] == "fp32" and precision["supported"], precision
    assert not any(f.kind == "budget" and "no bf16" in f.message for f in prof.findings)
    record = prof.run.records["inputs"]
    assert record["autocast"] == {}
    partial = record["autocast_partial"]
    assert partial["autocast"] == {"cpu": "bfloat16"} and 0 <= partial["share"] < 0.5
    found = _partial_findings(prof)
    assert len(found) == 1 and found[0].severity == "info"
    assert "\n" not in found[0].message and "bf16" in found[0].message \
        and "fp32" in found[0].message, found[0].message
    assert not memprof.findings(prof)   # (info: no gate fails on it)


def test_a_step_too_big_is_re_estimated_in_the_runs_dtype():
    """"What would fit" re-estimated the whole model in bf16 (the model's own autocast around
    its head stays in the copy: its code enters it)."""
    torch.manual_seed(0)
    model = SmallPartInBf16()
    opt = torch.optim.AdamW(model.parameters())
    with memprof.track(model, opt, budget=200_000) as prof:
        out = model(torch.randn(16, WIDTH))
        nn.functional.cross_entropy(out, torch.randint(0, 10, (16,))).backward()
        opt.step()
    estimate = prof.meta["fit"]["estimate"]
    assert estimate["precision"] == "fp32"
    assert "(fp32, micro-batch 16" in estimate["current"]["text"]


def test_autocast_over_the_forward_with_softmax_switched_off_is_the_runs_precision():
    torch.manual_seed(0)
    prof = _run(AllButSoftmax())
    assert prof.meta["budget"]["precision"]["run"] == "bf16"
    assert "autocast_partial" not in prof.run.records["inputs"]
    assert not _partial_findings(prof)


def test_an_autocast_entered_disabled_never_reads_as_mixed_precision():
    torch.manual_seed(0)
    prof = _run(OffOnly())
    assert prof.meta["budget"]["precision"]["run"] == "fp32"
    record = prof.run.records["inputs"]
    assert record["autocast"] == {} and "autocast_partial" not in record
    assert not _partial_findings(prof)


def test_the_parameters_are_weighed_during_the_first_pass_only():
    """(a global module hook sends every module call down torch's slow path)"""
    from torch.nn.modules import module as torch_module
    hooks = []

    class Probe(SmallPartInBf16):
        def forward(self, x):
            hooks.append(len(torch_module._global_forward_pre_hooks))
            return super().forward(x)

    before = len(torch_module._global_forward_pre_hooks)
    torch.manual_seed(0)
    prof = _run(Probe(), steps=3)
    assert hooks == [before + 1, before, before]
    assert len(torch_module._global_forward_pre_hooks) == before
    assert prof.run.records["inputs"]["autocast_partial"]["share"] < 0.5


FSDP_JOB = """
import sys, types, torch, memprof
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
inner = model.forward
def forward(self, *a, **k):                      # accelerate's wrapper of the forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return inner(*a, **k)
model._original_forward = inner
model.forward = types.MethodType(forward, model)
fsdp = FSDP(model, device_id=torch.device("cpu"))   # no wrap policy: all in the root unit
opt = torch.optim.AdamW(fsdp.parameters())
with memprof.track(fsdp, opt) as prof:
    for _ in range(2):
        fsdp(torch.randn(8, 64)).float().sum().backward()
        opt.step()
        opt.zero_grad()
r = prof.run.records["inputs"]
print(r.get("autocast"), r.get("autocast_partial"), [f.kind for f in prof.findings])
dist.destroy_process_group()
"""


def test_fsdp_around_an_autocast_forward_is_the_runs_precision(tmp_path):
    """FSDP keeps its flat parameter on the model it wraps, whose pre-hook runs before the
    wrapper's autocast: all of it counted as off - fp32, 'partial' at 0 %."""
    import subprocess
    import sys
    # a file rendezvous: a free port found here could be taken before the child bound it
    store = str(tmp_path / "rendezvous")
    r = subprocess.run([sys.executable, "-c", FSDP_JOB, store], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "{'cpu': 'bfloat16'} None []", r.stdout
