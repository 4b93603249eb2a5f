"""`memprof recommend --checkpointing / --precision`: what a value the command cannot plan is
said as, in one line naming the option, before the model is built."""
import sys
from pathlib import Path

import pytest

import memprof
from memprof import cli


def _cli(capsys, *args):
    rc = cli.main(["recommend", "--gpu", "v100-16gb", "--model", "mlp", "--effective-batch",
                   "8", "--no-confirm", "--json", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("given", ["", ",", " , "])
def test_an_empty_checkpointing_is_refused_not_taken_for_the_default(capsys, given):
    """`--checkpointing ""` (an unset shell variable) planned the default policies without a
    word, as if the option had been left out."""
    rc, out, err = _cli(capsys, "--checkpointing", given)
    assert rc == 2 and out == "", out
    assert err.strip() == (f"memprof: --checkpointing {given!r}: expected comma-separated "
                           "policies such as none,every; leave the option out for the "
                           "default (none,every,every-2,selective)"), err


@pytest.mark.parametrize("given, said", [
    ("fp8", "--precision 'fp8': expected fp32, fp16 or bf16"),
    ("fp16,bf16", "--precision 'bf16': v100-16gb has no bf16 hardware support; it supports "
                  "fp32 or fp16"),
    ("", "--precision '': expected comma-separated precisions such as fp32,fp16; leave the "
         "option out for the default (those the GPU has)"),
    (",", "--precision ',': expected comma-separated precisions such as fp32,fp16; leave the "
          "option out for the default (those the GPU has)")])
def test_a_precision_that_cannot_be_planned_names_the_option_before_the_model_is_built(
        capsys, tmp_path, monkeypatch, given, said):
    """It read "precision 'bf16': ...", the planner's word, not the option the user typed,
    and was found inside the search, after the model was built; --precision "" read
    "'NoneType' object is not iterable"."""
    (tmp_path / "counted_model.py").write_text(
        "import torch\nBUILT = []\n\ndef build():\n    BUILT.append(1)\n"
        "    return torch.nn.Linear(4, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "counted_model", raising=False)
    rc = cli.main(["recommend", "--gpu", "v100-16gb", "--model", "counted_model:build",
                   "--input-shape", "4", "--effective-batch", "8", "--precision", given])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.strip() == f"memprof: {said}", err
    assert "counted_model" not in sys.modules or sys.modules["counted_model"].BUILT == []


def test_the_python_api_says_precisions():
    from memprof.plan.errors import PlanInputError
    for given, said in [("fp8", "precisions 'fp8': expected fp32, fp16 or bf16"),
                        ("bf16", "precisions 'bf16': v100-16gb has no bf16 hardware "
                                 "support; it supports fp32 or fp16")]:
        with pytest.raises(PlanInputError, match=rf"^{said}$"):
            memprof.recommend("mlp", gpu="v100-16gb", effective_batch=8, precisions=[given])


def test_a_precision_the_models_own_weights_refuse_names_the_option(capsys, monkeypatch):
    """Found once the model is built (an fp16 model does not train in fp32 as built): said
    as --precision from the shell, as precisions from Python."""
    from memprof.plan.errors import PlanInputError
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "plan"))
    rc = cli.main(["recommend", "--gpu", "a100-40gb", "--model", "half_models:mlp_fp16",
                   "--batch-fn", "half_models:batch_fp16", "--precision", "fp32",
                   "--no-confirm", "--workers", "1"])
    out, err = capsys.readouterr()
    assert rc == 2 and err.startswith("memprof: --precision 'fp32': the model's weights are "), err
    assert len(err.strip().splitlines()) == 1, err
    from half_models import mlp_fp16, batch_fp16
    with pytest.raises(PlanInputError, match=r"^precisions 'fp32': the model's weights are "):
        memprof.recommend(mlp_fp16, batch=batch_fp16, gpu="a100-40gb", precisions=["fp32"],
                          confirm=False, workers=1)


def test_blocks_that_name_no_submodule_are_said_as_the_option(capsys):
    """`--blocks layers` on a model without that submodule read 'blocks: MLP has no
    submodule ...': the Python parameter's name, not the option the user typed."""
    rc, out, err = _cli(capsys, "--blocks", "layers")
    assert rc == 2 and out == "", out
    assert err.strip().splitlines()[-1] == \
        "memprof: --blocks: MLP has no submodule 'layers'", err


def test_a_bad_input_shape_is_said_as_the_option(capsys, tmp_path, monkeypatch):
    """`--input-shape 3,,224` read "input shape '3,,224': ..." (the parameter in words)."""
    (tmp_path / "tiny_cnn.py").write_text(
        "import torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1),\n"
        "                                  nn.Flatten(), nn.Linear(8, 10))\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc = cli.main(["recommend", "--gpu", "v100-16gb", "--model", "tiny_cnn:Net",
                   "--input-shape", "3,,224", "--effective-batch", "8", "--no-confirm"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", out
    assert err.strip().splitlines()[-1] == \
        "memprof: --input-shape '3,,224': expected integers such as 3,224,224", err
