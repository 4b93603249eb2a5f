"""The parameters at the peak, split into trainable (requires_grad) and frozen: a peft-LoRA
run read one "parameters" figure, frozen base and adapters together, so memprof could not say
how much of the model trains (what LoRA's rank changes) against the frozen base."""
import html
import json
import zipfile

import pytest
import torch
from rich.console import Console

import memprof
from memprof.analyse import summary
from memprof.cli import main
from memprof.units import fmt_bytes

pytest.importorskip("peft")
pytest.importorskip("transformers")


def tiny_lora_llama(rank=8):
    """A 2-layer Llama, random weights, embeddings tied to the LM head (one storage), its base
    in bf16 and frozen by peft, LoRA adapters (fp32) on q/v."""
    from tiny_mlp import lora_llama
    return lora_llama(rank, vocab=512, tie_word_embeddings=True)


def ground_truth(model) -> dict:
    """Bytes of trainable and frozen parameters (numel x element size), each storage once
    (tied weights); a storage that any of its parameters trains is trainable."""
    size, trains = {}, {}
    for p in model.parameters():
        key = p.untyped_storage().data_ptr()
        size[key] = max(size.get(key, 0), p.numel() * p.element_size())
        trains[key] = trains.get(key, False) or p.requires_grad
    return {"trainable": sum(b for k, b in size.items() if trains[k]),
            "frozen": sum(b for k, b in size.items() if not trains[k]), "not_trained": 0}


def lm_loss(model):
    x = torch.randint(0, 512, (2, 16))
    return model(input_ids=x, labels=x).loss


def mlp_loss(model):
    return model(torch.randn(8, 64)).square().mean()


def train(model, loss=lm_loss, steps=2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with memprof.track(model, opt) as prof:
        for _ in range(steps):
            loss(model).backward()
            opt.step()
            opt.zero_grad()
    return prof


def terminal(prof) -> str:
    con = Console(record=True, width=200)
    prof.report(console=con)
    return con.export_text()


def category_rows(text: str) -> dict:
    """The rows of the terminal's category table: label -> bytes cell."""
    table = text.split("Alive at the peak, by category")[1].split("Alive at the peak, by")[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 3 and cells[0]:
            rows[cells[0]] = cells[1]
    return rows


@pytest.fixture(scope="module")
def lora():
    model = tiny_lora_llama()
    embed = model.get_input_embeddings().weight
    assert embed is model.get_output_embeddings().weight       # tied: one storage
    truth = ground_truth(model)
    assert 0 < truth["trainable"] < truth["frozen"]
    return train(model), truth


def test_lora_parameters_split_into_trainable_and_frozen(lora, tmp_path, capsys):
    prof, truth = lora
    assert prof.breakdown("category")["parameters"] == truth["trainable"] + truth["frozen"]
    assert summary(prof)["parameters_at_peak"] == truth
    rows = category_rows(terminal(prof))
    assert rows["trainable (requires_grad)"] == fmt_bytes(truth["trainable"])
    assert rows["frozen"] == fmt_bytes(truth["frozen"])
    # the HTML report's category table, and memprof report --json on the saved profile
    page = tmp_path / "r.html"
    prof.export(str(page))
    text = page.read_text()
    for part, b in truth.items():
        assert (f'data-parameters="{part}" data-bytes="{b}"' in text) is bool(b)   # 0: no row
    saved = prof.save(str(tmp_path / "lora.memprof"))
    assert summary(memprof.load(saved))["parameters_at_peak"] == truth
    capsys.readouterr()
    assert main(["report", saved, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters_at_peak"] == truth


def edited_copy(saved, tmp_path, edit) -> str:
    """The profile at `saved` with its header's snapshots passed through `edit`."""
    with zipfile.ZipFile(saved) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    header = json.loads(members["header.json"])
    for s in header["snapshots"]:
        edit(s)
    members["header.json"] = json.dumps(header).encode()
    path = tmp_path / "edited.memprof"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return str(path)


def test_a_profile_saved_before_the_split_loads_and_reports_without_it(lora, tmp_path):
    prof, truth = lora
    saved = prof.save(str(tmp_path / "new.memprof"))
    loaded = memprof.load(edited_copy(saved, tmp_path, lambda s: s.pop("trainable", None)))
    assert loaded.breakdown("category")["parameters"] == sum(truth.values())
    assert summary(loaded)["parameters_at_peak"] is None
    rows = category_rows(terminal(loaded))
    assert "frozen" not in rows and rows["parameters"] == fmt_bytes(sum(truth.values()))
    loaded.export(str(tmp_path / "old.html"))
    assert "data-parameters" not in (tmp_path / "old.html").read_text()


def test_a_damaged_trainable_field_is_one_line(lora, tmp_path):
    from memprof.profile_file import ProfileFormatError
    saved = lora[0].save(str(tmp_path / "new.memprof"))

    def damage(s):
        if s.get("trainable"):
            s["trainable"][0] = 7
    with pytest.raises(ProfileFormatError, match=r"snapshots\[\d+\]\.trainable: expected one "
                                                 r"0, 1 or 2 per ptr"):
        memprof.load(edited_copy(saved, tmp_path, damage))


def test_a_model_with_nothing_frozen_says_nothing_extra(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 64))
    truth = ground_truth(model)
    assert truth["frozen"] == 0
    prof = train(model, mlp_loss)
    assert summary(prof)["parameters_at_peak"] == truth
    rows = category_rows(terminal(prof))
    assert rows["parameters"] == fmt_bytes(truth["trainable"])
    assert not {"frozen", "trainable (requires_grad)"} & set(rows)
    prof.export(str(tmp_path / "r.html"))
    assert "data-parameters" not in (tmp_path / "r.html").read_text()


def test_a_frozen_model_built_inside_the_block_is_split_too():
    """Parameters made inside the block are allocations of the run, named at the step end."""
    torch.manual_seed(0)
    with memprof.track(auto_modules=True) as prof:
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 64))
        model[0].requires_grad_(False)
        truth = ground_truth(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(2):
            mlp_loss(model).backward()
            opt.step()
            opt.zero_grad()
    assert truth["frozen"] == (64 * 256 + 256) * 4
    assert summary(prof)["parameters_at_peak"] == truth


def test_a_nested_block_and_its_outer_block_split_the_same():
    """A block inside another (track(model) inside memprof run's): its model, made before it,
    is noted in its own baseline and in the outer block's notes."""
    torch.manual_seed(0)
    with memprof.track(auto_modules=True) as outer:
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 64))
        model[2].requires_grad_(False)
        truth = ground_truth(model)
        inner = train(model, mlp_loss)
    assert truth["frozen"] == (256 * 64 + 64) * 4
    assert summary(inner)["parameters_at_peak"] == truth
    assert summary(outer)["parameters_at_peak"] == truth


def test_a_storage_shared_by_a_frozen_and_a_trainable_parameter_trains():
    """Two Parameter objects over one storage (a decoder weight made from the encoder's,
    frozen on one side only): counted once, as trainable - its optimizer updates it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    # the frozen one comes first in model.parameters()
    model[0].weight = torch.nn.Parameter(model[2].weight.data, requires_grad=False)
    model[3].requires_grad_(False)
    truth = ground_truth(model)
    # trainable: the shared weight, model[0]'s and model[2]'s biases; frozen: model[3]
    assert truth == {"trainable": (64 * 64 + 64 + 64) * 4, "frozen": (64 * 64 + 64) * 4,
                     "not_trained": 0}
    prof = train(model, mlp_loss)
    assert summary(prof)["parameters_at_peak"] == truth
