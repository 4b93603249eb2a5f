"""What a new-user sweep of `memprof recommend` found (each fails without its fix): a GPU typed
with a size it does not come in, `--lr` alone, a batch function that ignores its size, the
code of a non-best option with the best one's warmup, a warmup that is no whole number, and
"nothing fits" advice that a smaller batch cannot follow."""
import sys

import pytest
import torch

import memprof
from memprof import cli
from memprof.plan.errors import PlanInputError
from memprof.plan.gpus import lookup



@pytest.mark.parametrize("typed, sizes", [("v100-17gb", "v100-16gb, v100-32gb"),
                                          ("a100-41gb", "a100-40gb, a100-80gb")])
def test_a_gpu_typed_with_a_size_it_does_not_come_in_is_unknown(typed, sizes):
    """It was planned for the nearest size (a 17 GB V100 as the 16 GB one), silently."""
    with pytest.raises(ValueError, match=rf"unknown GPU '{typed}'; did you mean {sizes}"):
        lookup(typed)


@pytest.mark.parametrize("typed, canonical", [("t4 16gb", "t4"), ("h200 141gb", "h200"),
                                              ("a10g 24gb", "a10g"), ("A100 80GB", "a100-80gb")])
def test_sizes_as_sold_still_resolve(typed, canonical):
    assert lookup(typed).name == canonical


def test_lr_alone_is_an_input_error_not_ignored(capsys):
    assert cli.main(["recommend", "--gpu", "v100-16gb", "--model", "mlp",
                     "--effective-batch", "8", "--lr", "0.1"]) == 2
    assert "--lr 0.1: needs --base-lr and --base-batch" in capsys.readouterr().err
    with pytest.raises(PlanInputError, match="lr 0.001: needs base_lr and base_batch"):
        memprof.recommend("mlp", gpu="v100-16gb", effective_batch=8, lr=1e-3)


@pytest.mark.parametrize("warmup", [10.7, "100", True])
def test_a_warmup_that_is_no_whole_number_is_an_input_error(warmup):
    with pytest.raises(PlanInputError, match="warmup_steps: expected an int >= 0"):
        memprof.recommend("mlp", gpu="v100-16gb", effective_batch=8, warmup_steps=warmup)


def fixed_size_batch(batch_size=4):
    """Ignores the size it is asked for: every estimate would be of 4 samples. (Of the mlp's
    784 features: with 16, an estimate asked for 4 samples failed in the model instead, and
    with estimates in parallel processes which error came first was a race.)"""
    return torch.randn(4, 784), torch.randint(0, 3, (4,))


def test_a_batch_function_that_ignores_its_size_is_named(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fixed_batches", sys.modules[__name__])
    rc = cli.main(["recommend", "--gpu", "v100-16gb", "--model", "mlp",
                   "--batch-fn", f"{__name__}:fixed_size_batch", "--effective-batch", "8",
                   "--no-confirm"])
    err = capsys.readouterr().err
    assert rc != 0 and "returned 4 samples when asked for" in err, err


def test_the_code_of_another_option_uses_its_own_accumulation_for_the_warmup():
    plan = memprof.recommend("mlp", gpu="v100-16gb", effective_batch=16, precisions=["fp32"],
                             policies=["none"], warmup_steps=1000, confirm=False)
    other = next(o for o in plan.options if o.accumulation != plan.best.accumulation)
    steps = -(-1000 // other.accumulation)
    assert f"(s + 1) / {steps}))" in plan.code(other)
    assert plan.warmup_for(other)["warmup_optimizer_steps"] == steps
    best_steps = -(-1000 // plan.best.accumulation)
    assert f"(s + 1) / {best_steps}))" in plan.code()


def test_nothing_fits_at_micro_batch_1_says_a_smaller_batch_cannot_help(capsys):
    """The model's own memory is over the usable memory: it said 'lower the effective batch'
    (and exited 0)."""
    rc = cli.main(["recommend", "--gpu", "1mb", "--model", "mlp", "--effective-batch", "4",
                   "--precision", "fp32", "--checkpointing", "none", "--no-confirm"])
    out = capsys.readouterr().out
    assert rc == 1, out
    flat = " ".join(out.split())
    assert "Nothing fits: even micro-batch 1 needs" in flat and "cannot help" in flat
    assert "LoRA rank" in flat


@pytest.mark.parametrize("option", [["--input-shape", "3,224,224"], ["--num-classes", "5000"]])
def test_a_shape_or_classes_given_with_a_built_in_model_is_an_input_error(capsys, option):
    """They were ignored without a word (the built-in model makes its own batches)."""
    assert cli.main(["recommend", "--gpu", "v100-16gb", "--model", "mlp", "--effective-batch",
                     "8", *option]) == 2
    assert "not used with the built-in model 'mlp'" in capsys.readouterr().err


def test_a_tie_between_fp16_and_bf16_goes_to_bf16():
    """On a GPU with both they estimate the same speed and size; fp16 was listed first (it
    needs loss scaling, and T5's activations overflow it)."""
    plan = memprof.recommend("mlp", gpu="a100-40gb", effective_batch=8,
                             precisions=["fp16", "bf16"], policies=["none"], confirm=False)
    tied = [o for o in plan.options if o.micro_batch == plan.best.micro_batch and o.fits]
    assert {o.precision for o in tied} == {"fp16", "bf16"}
    assert tied[0].samples_per_s == tied[1].samples_per_s
    assert plan.best.precision == "bf16"


def _frozen_base(dtype=torch.float32):
    """A LoRA-shaped model: a large frozen base, a small trained head."""
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512),
                                torch.nn.Linear(512, 4)).to(dtype)
    for layer in model[:2]:
        layer.requires_grad_(False)
    model[2].float()
    return model


@pytest.mark.parametrize("dtype, advice", [(torch.float32, "keep them in bf16 or fp16"),
                                           (torch.bfloat16, "quantise them")])
def test_nothing_fits_with_a_frozen_base_names_the_base_not_the_lora_rank(dtype, advice):
    """A 52B base with rank-8 adapters was told to lower its LoRA rank: the frozen weights
    are the size, and half precision (or quantisation) is what shrinks them."""
    from memprof.report.plan import nothing_fits
    plan = memprof.recommend(_frozen_base(dtype), gpu="1mb", effective_batch=4,
                             input_shape=(512,), num_classes=4, precisions=["fp32"],
                             policies=["none"], confirm=False, workers=1)
    assert plan.best is None
    text = nothing_fits(plan)
    assert "525,312 of the 527,364 parameters do not train" in text, text
    assert advice in text and "LoRA rank" not in text


def test_a_prime_effective_batch_points_at_a_nearby_one_with_a_larger_micro_batch(capsys):
    """199 has no divisor but 1 below the largest micro-batch that fits: the plan ran
    micro-batch 1, 199 times, without a word that 200 would run much larger ones."""
    rc = cli.main(["recommend", "--gpu", "1.5gb", "--model", "vit-tiny", "--effective-batch",
                   "199", "--precision", "fp32", "--checkpointing", "none", "--no-confirm"])
    out = " ".join(capsys.readouterr().out.split())
    assert rc == 0 and "micro-batch 1 x 199" in out   # 140 fit
    assert "micro-batch 1 is the largest divisor of 199 that fits; effective batch 198 would " \
        "run micro-batch 99 x 2" in out, out
    plan = memprof.recommend("mlp", gpu="v100-16gb", effective_batch=16, precisions=["fp32"],
                             policies=["none"], confirm=False, workers=1)
    assert plan.nearby_batch(plan.best) is None   # 16 fits whole: nothing to point at


def test_a_policy_or_precision_given_twice_is_estimated_once():
    """`--checkpointing none,none` resubmitted its own second 'none' for ever (two workers
    spun for 10 minutes); 'none,off' printed two identical rows."""
    from memprof.plan.search import _policies
    assert _policies(None, ["none", "none"], "x") == ["none"]
    assert _policies(None, ["none", "every", "off", "every-1", "selective"], "x") == \
        ["none", "every", "selective"]
    plan = memprof.recommend("mlp", gpu="t4", effective_batch=8, precisions=["fp32", "fp32"],
                             policies=["none", "every", "none"], confirm=False, workers=1)
    rows = [(o.precision, o.checkpointing, o.micro_batch, o.accumulation)
            for o in plan.options]
    assert rows and len(set(rows)) == len(rows), rows        # no row twice


@pytest.mark.parametrize("given, said", [
    (0, "num_classes: expected a whole number >= 1, got 0"),
    (-3, "num_classes: expected a whole number >= 1, got -3"),
    (1000, "num_classes 1000: the model's output has 10 classes")])
def test_num_classes_that_the_model_cannot_take_is_one_line(given, said):
    """0 was ignored, -3 blamed a batch function 'make_batch' the user never wrote, and 1000 on
    a 10-output model printed code that failed with 'Target 160 is out of bounds'."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with pytest.raises(PlanInputError) as err:
        memprof.recommend(model, gpu="t4", effective_batch=8, input_shape=(16,),
                          num_classes=given, precisions=["fp32"], policies=["none"],
                          confirm=False, workers=1)
    assert said in str(err.value) and "\n" not in str(err.value)


def reads_a_value(batch_size=4):
    n = int(torch.randint(1, 5, ()).item())        # a value: fake tensors have none
    return torch.randn(batch_size, 16), torch.randint(0, n, (batch_size,))


def test_a_batch_function_that_reads_a_value_is_told_why_it_cannot():
    model = torch.nn.Sequential(torch.nn.Linear(16, 10))
    with pytest.raises(PlanInputError) as err:
        memprof.recommend(model, gpu="t4", effective_batch=8, batch=reads_a_value,
                          precisions=["fp32"], policies=["none"], confirm=False, workers=1)
    assert "fake tensors, which have shapes but no values" in str(err.value)


def test_zero_nodes_is_refused_as_negative_ones_are(capsys):
    """--nodes 0 was planned as one node (`args.nodes or 1`) where -3 was refused."""
    assert cli.main(["recommend", "--gpu", "a100-80gb", "--model", "mlp", "--effective-batch",
                     "8", "--gpus", "2", "--nodes", "0", "--no-confirm"]) == 2
    assert "--nodes: expected an int >= 1, got 0" in capsys.readouterr().err


def test_num_classes_as_a_numpy_int_and_with_the_users_own_loss():
    """np.int64(10) was refused by the new check; a model whose output is not the classes
    (a segmentation map) with the user's own loss is theirs to read."""
    import numpy as np
    model = torch.nn.Sequential(torch.nn.Linear(16, 10))
    plan = memprof.recommend(model, gpu="t4", effective_batch=4, input_shape=(16,),
                             num_classes=np.int64(10), precisions=["fp32"], policies=["none"],
                             confirm=False, workers=1)
    assert plan.best is not None
    plan = memprof.recommend(model, gpu="t4", effective_batch=4, input_shape=(16,),
                             num_classes=3, loss=lambda out, y: out.float().mean(),
                             precisions=["fp32"], policies=["none"], confirm=False, workers=1)
    assert plan.best is not None


def test_an_unknown_policy_is_said_as_policies_before_the_model_is_built():
    """memprof.recommend(..., policies=['sometimes']) read 'policy: unknown ...' (checkpoint's
    parameter), after building the model."""
    built = []

    def build():
        built.append(1)
        return torch.nn.Linear(4, 2)

    with pytest.raises(PlanInputError, match=r"^policies: unknown checkpointing policy "
                       r"'sometimes'; expected none, every, every-k such as every-2, or "
                       r"selective$"):
        memprof.recommend(build, input_shape=(4,), gpu="v100-16gb", effective_batch=8,
                          policies=["none", "sometimes"])
    with pytest.raises(TypeError, match=r"^policies: expected a string such as 'every'"):
        memprof.recommend(build, input_shape=(4,), gpu="v100-16gb", effective_batch=8,
                          policies=["none", 2])
    assert built == []
    plan = memprof.recommend(build, input_shape=(4,), gpu="v100-16gb", effective_batch=8,
                             precisions=["fp32"], policies=["none"], confirm=False, workers=1)
    with pytest.raises(ValueError, match=r"^checkpointing: unknown checkpointing policy "):
        plan.predict(4, "fp32", checkpointing="sometimes")


@pytest.mark.parametrize("gpu", ["v100-16gb", "t4"])
def test_a_precision_the_gpu_lacks_says_what_it_supports(capsys, gpu):
    """--precision bf16 on a V100 read 'v100-16gb has no bf16 hardware support' and no word of
    what to use instead."""
    has = " or ".join(p for p in ("fp32", "fp16", "bf16") if lookup(gpu).supports(p))
    said = f"precision 'bf16': {gpu} has no bf16 hardware support; it supports {has}"
    assert cli.main(["recommend", "--gpu", gpu, "--model", "mlp", "--effective-batch", "8",
                     "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert f"--{said}" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(PlanInputError, match=rf"^{said.replace('precision', 'precisions')}$"):
        memprof.recommend("mlp", gpu=gpu, effective_batch=8, precisions=["bf16"])
