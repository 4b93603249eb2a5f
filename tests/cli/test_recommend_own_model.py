"""`memprof recommend` for the user's own model, typed in the directory where its module is:
import from the current directory, --effective-batch from the batch function, a dict batch
without targets, the model's own loss, and code that runs as printed (issue 14)."""
import json
import os
import sys
import textwrap

import pytest
import torch

from memprof.cli import main
from memprof.models import MODELS

MODULE = textwrap.dedent("""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    def tiny_bert():
        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64, num_labels=3)
        return BertForSequenceClassification(cfg)

    def with_labels(batch_size=6):          # a dict batch, no targets: the model's own loss
        return {"input_ids": torch.randint(0, 100, (batch_size, 16)),
                "labels": torch.randint(0, 3, (batch_size,))}

    def inputs_only(batch_size):            # no labels, no targets, no default size
        return {"input_ids": torch.randint(0, 100, (batch_size, 16))}
""")


@pytest.fixture
def own_models(tmp_path, monkeypatch):
    """A directory with own_models_cli.py, made the current directory; not on sys.path."""
    (tmp_path / "own_models_cli.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "own_models_cli", raising=False)
    assert str(tmp_path) not in sys.path and "" not in sys.path
    return tmp_path


def _cli(capsys, *args):
    rc = main(["recommend", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _run_code(code: str, directory) -> dict:
    """Execute a plan's code as a script in `directory` would run: a fresh namespace, the
    script's directory on the path."""
    sys.path.insert(0, str(directory))
    try:
        ns: dict = {}
        exec(compile(code, "<plan code>", "exec"), ns)
        return ns
    finally:
        sys.path.remove(str(directory))


def test_own_model_from_the_current_directory_with_its_own_loss(capsys, own_models):
    before = list(sys.path)
    rc, out, err = _cli(capsys, "--gpu", "a100-40gb", "--model", "own_models_cli:tiny_bert",
                        "--batch-fn", "own_models_cli:with_labels", "--precision",
                        "fp32,bf16", "--checkpointing", "none", "--no-confirm", "--json")
    assert rc == 0, err
    # (two combinations: estimated side by side in forked workers where there are 2 cores)
    assert sys.path == before                        # the current directory was taken off again
    plan = json.loads(out)
    assert plan["effective_batch"] == 6              # the batch function's own batch size
    assert plan["model"]["loss"] == {"rule": "own", "output": ".loss"}
    code = plan["code"]
    assert "loss = model(**x).loss" in code and "loss_fn" not in code
    torch.manual_seed(0)
    ns = _run_code(code, own_models)
    model = ns["model"]
    assert torch.isfinite(ns["loss"]).all()
    # two micro-steps of accumulation 1: the optimizer stepped twice, gradients cleared
    assert all(p.grad is None for p in model.parameters())     # zeroed after its step
    assert ns["opt"].state and all(s["step"] == 2 for s in ns["opt"].state.values())


def test_code_for_a_dict_batch_without_targets_or_labels(capsys, own_models):
    rc, out, err = _cli(capsys, "--gpu", "a100-40gb", "--model", "own_models_cli:tiny_bert",
                        "--batch-fn", "own_models_cli:inputs_only", "--effective-batch", "4",
                        "--precision", "fp16", "--checkpointing", "every", "--no-confirm",
                        "--json")
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["model"]["loss"] == {"rule": "mean", "output": ".logits"}
    code = plan["code"]
    assert "for i, x in enumerate(loader)" in code and "memprof.checkpoint.apply" in code
    ns = _run_code(code, own_models)
    assert ns["loss"].dim() == 0 and torch.isfinite(ns["loss"])
    assert ns["handle"] is not None and ns["scaler"] is not None


def test_effective_batch_is_required_only_without_a_batch_size(capsys, own_models):
    cases = [(["--model", "mlp"], "--model mlp has no batch size of its own"),
             (["--model", "own_models_cli:tiny_bert", "--batch-fn",
               "own_models_cli:inputs_only"], "def batch(batch_size=32)")]
    for args, needle in cases:
        rc, out, err = _cli(capsys, "--gpu", "a100-40gb", *args)
        assert rc == 2 and needle in err and "--effective-batch: required" in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_help_lists_the_built_in_models_and_explains_batch_fn(capsys):
    with pytest.raises(SystemExit):
        main(["recommend", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in MODELS)
    assert "function(batch_size) returns (inputs, targets) or inputs alone" in text
    assert "outputs.loss" in text and "current directory" in text


def test_every_option_in_help_says_its_default_or_that_it_is_required():
    """--blocks, --gpus, --base-lr, --lr, --warmup-steps, --input-shape, --html (and --gpu /
    --model, which are required) said nothing of what happens without them."""
    from memprof.cli import _subparsers, build_parser
    rec = _subparsers(build_parser())["recommend"]
    silent = [a.option_strings[-1] for a in rec._actions if a.option_strings != ["-h", "--help"]
              and not any(w in (a.help or "") for w in ("default", "required"))]
    assert not silent, silent


def test_search_limit_and_repeated_messages_are_said_once(capsys):
    """A tiny MLP fits any batch: its line never claims the search limit as a maximum, and
    the same text for several combinations is printed once, naming them."""
    rc, out, err = _cli(capsys, "--gpu", "a100-40gb", "--model", "mlp", "--effective-batch",
                        "8", "--precision", "fp32,bf16", "--checkpointing", "none,every",
                        "--no-confirm")
    assert rc == 0, err
    text = " ".join(out.split())
    assert "65536" not in text
    assert "fp32/none, bf16/none: the whole effective batch 8 in one micro-batch" in text
    assert text.count("already fits in fp32") == 1
    rc, out, err = _cli(capsys, "--gpu", "a100-40gb", "--model", "mlp", "--effective-batch",
                        str(10 ** 6), "--precision", "fp32", "--checkpointing", "none",
                        "--no-confirm", "--json")
    assert rc == 0, err
    combo = json.loads(out)["combinations"][0]
    assert combo["max_micro_batch_is_search_limit"] is True
    rc, out, err = _cli(capsys, "--gpu", "a100-40gb", "--model", "mlp", "--effective-batch",
                        str(10 ** 6), "--precision", "fp32", "--checkpointing", "none",
                        "--no-confirm")
    assert "more than 65535 (the search stops there)" in " ".join(out.split())


def test_cwd_is_not_left_on_the_path_after_an_error(capsys, own_models):
    before = list(sys.path)
    rc, out, err = _cli(capsys, "--gpu", "a100-40gb", "--model", "own_models_cli:nothing",
                        "--batch-fn", "own_models_cli:with_labels", "--no-confirm")
    assert rc == 2 and "no function or class 'nothing'" in err
    assert sys.path == before and os.getcwd() == str(own_models)


def test_the_printed_code_runs_when_stdout_is_a_pipe(capsys, own_models, monkeypatch):
    """Piped output is 80 columns wide: the plan's code is still printed in whole lines
    (it is meant to be copied), so the code after the best option compiles as Python."""
    monkeypatch.setenv("COLUMNS", "80")
    rc, out, err = _cli(capsys, "--gpu", "a100-40gb", "--model", "own_models_cli:tiny_bert",
                        "--batch-fn", "own_models_cli:with_labels", "--precision", "fp32",
                        "--checkpointing", "none", "--no-confirm", "--workers", "1")
    assert rc == 0, err
    lines = out.splitlines()
    best = next(i for i, line in enumerate(lines) if line.startswith("Best (estimated)"))
    start = next(i for i in range(best, len(lines)) if lines[i].startswith("import "))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    code = "\n".join(lines[start:end])
    assert max(len(line) for line in lines[start:end]) > 80   # long lines were kept whole
    compile(code, "<printed plan code>", "exec")


def test_a_blocks_name_the_model_lacks_is_one_line_not_nothing_fits(capsys, own_models):
    rc, out, errtext = _cli(capsys, "--gpu", "a100-40gb", "--model", "own_models_cli:tiny_bert",
                            "--batch-fn", "own_models_cli:with_labels", "--blocks",
                            "encoder.nope", "--checkpointing", "every", "--no-confirm",
                            "--workers", "1")
    assert rc == 2
    assert "has no submodule 'encoder.nope'" in errtext and "\n" not in errtext.strip()
    assert "Nothing fits" not in out


def test_a_model_given_as_a_file_path_is_imported_from_its_folder(capsys, own_models,
                                                                  monkeypatch):
    """`--model ./own_models_cli.py:tiny_bert`, what a user types first, was a TypeError about
    relative imports; from another directory the file's folder is where its imports are
    found (as `python path/to/file.py` finds them), and the path is as it was after."""
    (own_models / "sub").mkdir()
    monkeypatch.chdir(own_models / "sub")
    before = list(sys.path)
    rc, out, err = _cli(capsys, "--gpu", "16G", "--model", "../own_models_cli.py:tiny_bert",
                        "--batch-fn", f"{own_models}/own_models_cli.py:with_labels",
                        "--no-confirm", "--json")
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["gpu"]["memory_bytes"] == 16 << 30 and plan["options"], plan["gpu"]
    assert sys.path == before
    # its code ran as written from here: it printed `from ../own_models_cli.py import ...`
    assert f"sys.path.insert(0, {str(own_models)!r})" in plan["code"]
    sys.modules.pop("own_models_cli", None)
    try:
        ns = _run_code(plan["code"], own_models / "sub")
    finally:
        sys.path[:] = before
    assert torch.isfinite(ns["loss"]).all()
    (own_models / "json.py").write_text("def build():\n    return None\n")
    for spec, said in (("../nothere.py:tiny_bert", "no such file '../nothere.py'"),
                       ("../own_models_cli:tiny_bert", "expected 'module:function'"),
                       ("../json.py:build", "a module named 'json' is already imported from")):
        rc, out, err = _cli(capsys, "--gpu", "t4", "--model", spec, "--effective-batch", "8")
        assert rc == 2 and said in err and err.count("\n") == 1, err


def test_a_file_whose_name_is_no_identifier_prints_code_that_imports_it(capsys, own_models):
    """`--model train-model.py:tiny_bert` imports (importlib takes the name); the printed code
    said `from train-model import tiny_bert`, a SyntaxError, and must run as printed."""
    (own_models / "train-model.py").write_text(MODULE)
    before = list(sys.path)
    rc, out, err = _cli(capsys, "--gpu", "16G", "--model", "./train-model.py:tiny_bert",
                        "--batch-fn", "./train-model.py:with_labels", "--no-confirm", "--json")
    assert rc == 0, err
    code = json.loads(out)["code"]
    assert "from train-model" not in code and "importlib.import_module('train-model')" in code
    sys.modules.pop("train-model", None)
    try:
        ns = _run_code(code, own_models)
    finally:
        sys.path[:] = before
        sys.modules.pop("train-model", None)
    assert torch.isfinite(ns["loss"]).all()
