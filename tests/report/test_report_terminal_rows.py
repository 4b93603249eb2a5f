"""The terminal report's top-N tables say what they leave out: "Alive at the peak, by module"
showed 8 of 13 modules with nothing to say so, and did not add up to the peak."""
import re

import torch
from rich.console import Console

import memprof
from memprof.units import fmt_bytes


def test_the_rows_past_the_top_are_one_row_with_their_bytes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(12)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt) as prof:
        for _ in range(2):
            model(torch.randn(16, 64)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    by_module = prof.breakdown("module")
    assert len(by_module) > 8
    con = Console(record=True, width=200)
    prof.report(console=con, top=8)
    text = con.export_text()
    table = text[text.index("Alive at the peak, by module"):]
    table = table[:table.index("Alive at the peak, by op")]
    more = re.search(r"\.\.\. (\d+) more\s*│\s*([\d.]+ \w+)", table)
    assert more is not None, table
    assert int(more.group(1)) == len(by_module) - 8
    rest = sum(list(by_module.values())[8:])
    assert more.group(2) == fmt_bytes(rest)


def test_a_ranks_samples_per_second_say_they_are_the_ranks():
    """A rank's report read "samples/s 2312" where the job ran twice that, unlabelled, beside
    recommend --gpus quoting the whole job's."""
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt, batch_size=16) as prof:
        for _ in range(6):
            model(torch.randn(16, 32)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    prof.profile.meta.update(rank=1, world_size=2)   # as a torchrun rank's profile says
    con = Console(record=True, width=300)
    prof.report(console=con)
    assert "of rank 1 (the job's: about 2 x this" in con.export_text()


def test_steps_marked_by_hand_are_not_called_optimizer_steps():
    """--step-on Trainer.training_step (a micro-batch each) read "Throughput per optimizer
    step" and "micro-steps per optimizer step 1" over 4 micro-batches per update."""
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt, step_on="manual") as prof:
        for i in range(8):
            model(torch.randn(16, 32)).square().mean().backward()
            if i % 4 == 3:
                opt.step()
                opt.zero_grad()
            prof.step()
    con = Console(record=True, width=300)
    prof.report(console=con)
    text = con.export_text()
    assert "Throughput per marked step (prof.step() or --step-on FUNCTION)" in text
    assert "micro-steps per marked step 1" in text and "per optimizer step" not in text
