"""`memprof run` learns the batch size of a model called with keyword arguments
(`model(input_ids=ids, labels=ids)`, as Hugging Face models are): a global pre-hook is not
given them, the global forward hook is, at the pass's end. `--batch-size N` sets it where no
input says it."""
import json
import textwrap

import pytest

from memprof.cli import main

SCRIPT = textwrap.dedent('''
    import torch

    class TokenModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.head = torch.nn.Linear(16, 50)

        def forward(self, input_ids=None, labels=None):
            logits = self.head(self.emb(input_ids))
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    def train():
        torch.manual_seed(0)
        model = TokenModel()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            ids = torch.randint(0, 50, (6, 12))
            loss = model(input_ids=ids, labels=ids)
            loss.backward()
            opt.step()
            opt.zero_grad()

    if __name__ == "__main__":
        train()
''')


def _run(tmp_path, capsys, *options):
    script = tmp_path / "kwargs_train.py"
    script.write_text(SCRIPT)
    rc = main(["run", "--json", *options, str(script)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_batch_size_of_a_model_called_with_keywords(tmp_path, capsys):
    rc, out, err = _run(tmp_path, capsys)
    assert rc == 0, err
    tp = json.loads(out)["throughput"]
    # from the global forward hook's keyword arguments, at each pass's end
    assert tp["batch_size"] == 6 and tp["stats"]["samples_per_s"]["median"] > 0
    assert tp["batch_size_source"] != "track(batch_size=...)"
    # the inputs described are a call's whose keyword arguments were seen
    import memprof
    inputs = memprof.load(str(tmp_path / "kwargs_train.memprof")).run.records["inputs"]
    assert inputs["args"] == [] and set(inputs["kwargs"]) == {"input_ids", "labels"}


def test_batch_size_option_overrides(tmp_path, capsys):
    rc, out, err = _run(tmp_path, capsys, "--batch-size", "4")
    assert rc == 0, err
    tp = json.loads(out)["throughput"]
    assert tp["batch_size"] == 4 and tp["batch_size_source"] == "track(batch_size=...)"


@pytest.mark.parametrize("value", ["0", "-2", "six"])
def test_a_bad_batch_size_is_one_line(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exc:
        _run(tmp_path, capsys, "--batch-size", value)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --batch-size: expected a whole number >= 1" in err
