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
    assert "of rank 1 (the job's: the sum over its 2 ranks, about 2 x this for ranks alike " \
        "in batch and speed" in con.export_text()


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


def test_long_module_names_are_shown_whole_in_a_narrow_terminal():
    """At 80 columns the module table cut names at the end: a LoRA model's
    `...layers.1.self_attn.q_proj.lora...` rows for lora_A and lora_B read the same."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attention_projection_query_low_rank_adaptation_A = torch.nn.Linear(32, 32)
            self.self_attention_projection_query_low_rank_adaptation_B = torch.nn.Linear(32, 32)

        def forward(self, x):
            return (self.self_attention_projection_query_low_rank_adaptation_B(
                self.self_attention_projection_query_low_rank_adaptation_A(x)))

    model = torch.nn.Sequential(*[Block() for _ in range(2)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt) as prof:
        for _ in range(2):
            model(torch.randn(8, 32)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    con = Console(record=True, width=80)
    prof.report(console=con, top=20)
    text = con.export_text()
    table = text[text.index("Alive at the peak, by module"):text.index("Alive at the peak, by op")]
    joined = "".join(line.split("│")[1].strip() for line in table.splitlines()
                     if line.count("│") == 4)
    for name in prof.breakdown("module"):
        if name.startswith("Sequential."):
            assert name in joined, (name, table)
    assert "…" not in table


def test_byte_counts_take_the_unit_they_round_into():
    """1048575 bytes read "1024.00 KiB", and the README's 1 PiB request "1024.00 TiB"."""
    assert fmt_bytes(1048575) == "1.00 MiB" and fmt_bytes(1048569) == "1023.99 KiB"
    assert fmt_bytes(2 ** 50) == "1.00 PiB" and fmt_bytes(-1536) == "-1.50 KiB"
    assert fmt_bytes(1023) == "1023 B" and fmt_bytes(2 ** 60) == "1.00 EiB"


def test_a_finding_without_bytes_shows_none_rather_than_zero():
    """A non-finite loss is no memory finding: its row read "0 B" in the bytes column."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt, health=True) as prof:
        for _ in range(3):
            (model(torch.randn(4, 8)).sum() * float("nan")).backward()
            opt.step()
            opt.zero_grad()
    without = [f for f in prof.findings if not f.bytes]
    assert without, [f.kind for f in prof.findings]
    con = Console(record=True, width=200)
    prof.report(console=con)
    text = con.export_text()
    table = text[text.index("Findings"):]
    rows = [line.split("│") for line in table.splitlines() if line.count("│") == 5]
    assert rows and all(cells[3].strip() != "0 B" for cells in rows)
    assert any(cells[3].strip() == "-" for cells in rows), table


def test_an_empty_block_says_nothing_was_allocated():
    with memprof.track() as prof:
        pass
    con = Console(record=True, width=120)
    prof.report(console=con)
    text = " ".join(con.export_text().split())
    assert "Nothing was allocated inside the block" in text
    assert "Alive at the peak" not in text


def test_export_checks_its_path_before_the_work(tmp_path):
    """memprof.export() into a missing directory named its own temporary file in a
    FileNotFoundError, after building the whole page; a directory read 'unknown format'."""
    import pytest
    with memprof.track() as prof:
        torch.randn(8)
    (tmp_path / "adir.html").mkdir()
    for path, said in ((tmp_path / "nodir" / "a.html", "does not exist"),
                       (tmp_path / "adir.html", "is a directory"),
                       (tmp_path, "is a directory")):
        with pytest.raises(ValueError) as err:
            memprof.export(prof.profile, str(path))
        assert said in str(err.value) and ".tmp" not in str(err.value), str(err.value)
