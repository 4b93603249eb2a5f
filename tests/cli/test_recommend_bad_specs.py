"""`memprof recommend` names what is wrong with a model spec or an input shape first, in one
line: a non-callable attribute is not "missing", `3,x,32` is not `3,32`, a wrong model spec
is said before "give --input-shape", and --input-shape beside --batch-fn is not ignored."""
import subprocess
import sys
import textwrap

import pytest

from memprof.cli import main

MODULE = textwrap.dedent("""
    import torch
    NOT_CALLABLE = 3

    def build():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))

    def batch(batch_size=4):
        return torch.randn(batch_size, 3, 8, 8), torch.randint(0, 4, (batch_size,))

    def three(batch_size=4):
        return (torch.randn(batch_size, 3, 8, 8), torch.randint(0, 4, (batch_size,)),
                torch.ones(batch_size))
""")


@pytest.fixture
def models_dir(user_module):
    return user_module("spec_models_cli", MODULE)


@pytest.mark.parametrize("args, message", [
    (["--model", "spec_models_cli:NOT_CALLABLE", "--batch-fn", "spec_models_cli:batch"],
     "model 'spec_models_cli:NOT_CALLABLE': spec_models_cli.NOT_CALLABLE = 3 is not a "
     "function or class"),
    (["--model", "spec_models_cli:nope"],
     "model 'spec_models_cli:nope': spec_models_cli has no function or class 'nope'"),
    (["--model", "no_such_module_x:build"],
     "model 'no_such_module_x:build': cannot import no_such_module_x"),
    (["--model", "spec_models_cli:build", "--input-shape", "3,x,8"],
     "--input-shape '3,x,8': expected integers such as 3,224,224"),
    (["--model", "spec_models_cli:build", "--input-shape", "3,8,8", "--batch-fn",
      "spec_models_cli:batch"],
     "--input-shape 3,8,8: not used with --batch-fn"),
    # a built-in model's options: 'MLP.__init__() got an unexpected keyword argument' named
    # none it takes; a value of the wrong type: "'str' object cannot be interpreted as an
    # integer"
    (["--model", "mlp", "--model-arg", "foo=3"],
     "model mlp: no option foo (--model-arg / model_kwargs); expected some of depth, drop, "
     "hidden, in_features, num_classes"),
    (["--model", "dcal-vit-tiny", "--model-arg", "atention_backend=fused"],
     "model dcal-vit-tiny: no option atention_backend (--model-arg / model_kwargs); expected "
     "some of attention_backend, attn_drop,"),
    (["--model", "mlp", "--model-arg", "depth=abc"],
     "model mlp: depth='abc' (--model-arg / model_kwargs): expected an int, as its default 2"),
    (["--model", "vit-tiny", "--model-arg", "drop=high"],
     "model vit-tiny: drop='high' (--model-arg / model_kwargs): expected a float, as its "
     "default 0.0"),
])
def test_bad_input_is_one_line_naming_it(models_dir, capsys, args, message):
    rc = main(["recommend", "--gpu", "a100-80gb", "--workers", "1", "--effective-batch", "8",
               *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_shape_with_x_separators_still_works(models_dir, capsys):
    rc = main(["recommend", "--gpu", "a100-80gb", "--workers", "1", "--precision", "fp32",
               "--checkpointing", "none", "--model", "spec_models_cli:build",
               "--input-shape", "3x8x8", "--num-classes", "4", "--effective-batch", "8",
               "--json"])
    assert rc == 0 and '"input_shape": [\n' in capsys.readouterr().out


def test_an_unknown_model_is_said_before_the_missing_effective_batch(capsys):
    rc = main(["recommend", "--gpu", "v100-16gb", "--model", "nosuch"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("memprof: model 'nosuch': not a built-in (mlp, "), err
    # a Hub name (gpt2, bert-base-uncased) is said how to be given: nothing is downloaded
    [line] = [x for x in err.splitlines() if x.startswith("memprof: model 'nosuch'")]
    assert "a Hugging Face model: a function in your module that builds it from its config" \
        in line


@pytest.mark.parametrize("flag, value", [("--lr", "-1"), ("--base-lr", "0"),
                                         ("--base-batch", "0"), ("--lr", "nan"),
                                         ("--effective-batch", "0"), ("--workers", "0"),
                                         ("--warmup-steps", "-5")])
def test_learning_rates_and_batches_must_be_positive(capsys, flag, value):
    """--lr -1 was accepted without a word (and advice was given against it); --effective-batch
    0, --workers 0 and --warmup-steps -5 were refused under the Python API's names
    ('effective_batch: expected an int >= 1'), which the user never typed."""
    with pytest.raises(SystemExit) as exit_:
        main(["recommend", "--gpu", "v100-16gb", "--model", "mlp", "--effective-batch", "8",
              flag, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {flag}: expected" in err, err


def test_a_shape_the_model_rejects_is_one_line_without_torchs_traceback_log(models_dir):
    """FakeTensorMode logged ~40 lines `E... fake_tensor.py] Traceback ...` before the one
    line: it read as a crash (a process of its own: torch's log handler writes to the
    terminal's stderr, not to what pytest captures)."""
    run = subprocess.run([sys.executable, "-m", "memprof.cli", "recommend", "--gpu", "t4",
                          "--workers", "1", "--effective-batch", "8", "--model",
                          "spec_models_cli:build", "--input-shape", "3,16,16"],
                         cwd=models_dir, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "the model rejects a batch of this shape" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_a_batch_functions_own_size_not_divisible_by_the_gpus_says_where_it_came_from(
        models_dir, capsys):
    """'effective batch 4: not divisible by the world size 3' named a number the user never
    typed (the batch function's default)."""
    rc = main(["recommend", "--gpu", "t4", "--gpus", "3", "--model", "spec_models_cli:build",
               "--batch-fn", "spec_models_cli:batch"])
    err = capsys.readouterr().err
    assert rc == 2 and "the batch function's own batch size 4 is not divisible by --gpus 3" \
        in err and "e.g. 12" in err and len(err.strip().splitlines()) == 1, err


def test_a_batch_of_three_the_model_cannot_take_names_the_batch_function(models_dir, capsys):
    """A batch function returning (x, y, w): 'a training step failed under fake tensors:
    TypeError: Sequential.forward() takes 2 positional arguments but 4 were given'."""
    rc = main(["recommend", "--gpu", "t4", "--workers", "1", "--effective-batch", "8",
               "--model", "spec_models_cli:build", "--batch-fn", "spec_models_cli:three"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "batch function 'three' returned a tuple of 3" in err and "model(*x)" in err
    assert "Sequential.forward() takes 1 input (input)" in err and "fake tensors" not in err
    assert "(inputs, targets)" in err


def test_an_unknown_checkpointing_policy_names_the_option_and_the_forms(capsys):
    """--checkpointing sometimes read 'policy: unknown checkpointing policy ...', the Python
    parameter's name, which the user never typed."""
    rc = main(["recommend", "--gpu", "v100-16gb", "--model", "mlp", "--effective-batch", "8",
               "--checkpointing", "none,sometimes"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--checkpointing: unknown checkpointing policy 'sometimes'; expected none, every, " \
           "every-k such as every-2, or selective" in err and "policy:" not in err, err
