"""memprof.recommend: what fits, ranked; LR and warmup advice; the CLI and its errors."""
import json
import textwrap

import pytest

import memprof
from memprof import cli
from memprof.plan.estimate import Estimator
from memprof.plan.gpus import lookup
from memprof.models import build_model
from memprof.plan.advice import lr_advice, warmup_advice

MiB = 1 << 20


def _small_gpu_kw(usable):
    """A V100 whose usable memory is shrunk to `usable` bytes (tiny models fit exactly)."""
    return dict(gpu="v100-16gb", overhead=lookup("v100-16gb").memory_bytes - usable, margin=0.0)


def test_plan_on_a_small_gpu():
    usable = 80 * MiB
    plan = memprof.recommend("vit-tiny", effective_batch=64, precisions=["fp16", "fp32"],
                             policies=["none", "every"], **_small_gpu_kw(usable))
    assert plan.usable_bytes == usable
    assert {o.micro_batch * o.accumulation for o in plan.options} == {64}
    for o in plan.options:
        assert o.fits == (o.peak_reserved <= usable)
        assert o.headroom == usable - o.peak_reserved
        assert o.peak_reserved >= o.peak_allocated > 0 and o.samples_per_s > 0
    best = plan.best
    assert best.fits
    assert best.samples_per_s == max(o.samples_per_s for o in plan.options if o.fits)
    assert plan.options[0] == best
    for prec in ("fp16", "fp32"):
        # checkpointing every block lets a larger micro-batch fit
        assert plan.max_micro_batch(prec, "every") > plan.max_micro_batch(prec, "none") >= 1
        m = plan.max_micro_batch(prec, "none")
        assert plan.predict(m, prec, "none", accumulation=2).fits
        assert not plan.predict(m + 1, prec, "none", accumulation=2).fits
    # a prediction equals an estimate run at that micro-batch
    model, make_batch, loss_fn = build_model("vit-tiny")
    est = Estimator(model, make_batch, loss_fn, gpu=plan.gpu).step(  # the plan's CUDA kernels
        12, precision="fp16", checkpointing="every")
    p = plan.predict(12, "fp16", "every")                     # accumulation 6: gradients live
    assert p.peak_reserved == est.accumulating_peak_reserved
    assert p.peak_allocated == est.accumulating_peak_allocated
    assert plan.predict(12, "fp16", "every", accumulation=1).peak_allocated == \
        est.steady_peak_allocated
    d = json.loads(plan.to_json())
    assert d["estimated"] is True and d["best"]["micro_batch"] == best.micro_batch
    assert len(d["options"]) == len(plan.options) and d["gpu"]["name"] == "v100-16gb"
    # an exact batch model predicts the estimate's own stream (as just checked): only the
    # recommended option is confirmed, by an estimate at its micro-batch; interpolated peaks
    # are confirmed at every boundary (refitted through that point when > 0.5 % off)
    assert best.confirmed and plan.estimates == 2 * 4 + 1
    assert all(c["confirmed_at"] is not None for c in d["combinations"]
               if not c["exact_interpolation"]), d["combinations"]
    assert [(c["precision"], c["checkpointing"]) for c in d["combinations"]
            if c["confirmed_at"] is not None] == [(best.precision, best.checkpointing)]
    code = plan.code()
    assert "memprof.checkpoint.apply" in code or best.checkpointing == "none"
    assert f"accumulation = {best.accumulation}" in code
    with pytest.raises(ValueError):          # not a policy (others are estimated on demand)
        plan.max_micro_batch("fp16", "no-such-policy")


def test_precisions_follow_the_gpu():
    with pytest.raises(ValueError, match="bf16"):
        memprof.recommend("mlp", gpu="v100-16gb", effective_batch=8, precisions=["bf16"])
    plan = memprof.recommend("mlp", gpu="a100-40gb", effective_batch=8, policies=["none"],
                             confirm=False)
    assert {o.precision for o in plan.options} == {"fp32", "fp16", "bf16"}
    # everything fits an MLP: no checkpointing needed, the whole batch in one micro-step ranks
    # first (fewest optimizer-step overheads)
    assert plan.best.micro_batch == 8 and plan.best.accumulation == 1


def test_seeds_dcal_on_a_16gb_v100():
    """seeds/000-001: micro-batch 8 without checkpointing OOMs a 16 GB V100; checkpointing
    gets to effective batch 16."""
    plan = memprof.recommend("dcal-vit-b16", gpu="v100-16gb", effective_batch=16,
                             precisions=["fp16"], policies=["none", "every"], confirm=False)
    none8 = [o for o in plan.options if o.checkpointing == "none" and o.micro_batch == 8]
    assert none8 and not none8[0].fits and none8[0].peak_reserved > 16 * (1 << 30)
    assert any(o.fits and o.checkpointing == "every" for o in plan.options)
    assert plan.max_micro_batch("fp16", "every") > plan.max_micro_batch("fp16", "none")


def test_lr_advice_catches_the_40x_of_seed_003():
    # base recipe: effective batch 8 at lr 2.5e-4; new run: effective batch 128 at lr 1e-4
    adv = lr_advice(2.5e-4, 8, 128, "adamw", lr=1e-4)
    assert adv.recommended_lr == pytest.approx(4e-3)
    assert adv.sqrt_lr == pytest.approx(1e-3)
    assert adv.warning and "40x smaller" in adv.warning
    # seeds/002: SGD, 0.1 at 256 -> 0.8 at 2048 (linear)
    adv = lr_advice(0.1, 256, 2048, "sgd", lr=0.8)
    assert adv.recommended_lr == pytest.approx(0.8) and adv.warning is None
    # ... and the 3.2 its documentation gave (0.1 x sqrt(32) x 2), which diverged to NaN
    adv = lr_advice(0.1, 256, 2048, "sgd", lr=3.2)
    assert adv.warning and "4x larger than the linearly scaled 0.8" in adv.warning
    assert lr_advice(0.1, 256, 2048, "sgd", lr=1.2).warning is None   # 1.5x: a recipe's own
    assert lr_advice(5e-4, 512, 16, "adamw").recommended_lr == pytest.approx(1.5625e-5)
    with pytest.raises(ValueError):
        lr_advice(5e-4, None, 16)


def test_warmup_is_counted_in_optimizer_steps():
    w = warmup_advice(200, 16, 16)  # seeds/004: batch 1 x 16 accumulation, warmup 200
    assert w["warmup_optimizer_steps"] == 13
    assert "ceil(200 / 16) = 13" in w["formula"]


def _cli(capsys, *args):
    rc = cli.main(["recommend", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_json_and_table(capsys):
    rc, out, err = _cli(capsys, "--gpu", "v100-16gb", "--model", "mlp", "--effective-batch",
                        "8", "--precision", "fp16", "--checkpointing", "none", "--no-confirm",
                        "--base-lr", "5e-4", "--base-batch", "512", "--lr", "1e-2",
                        "--warmup-steps", "100", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["best"]["precision"] == "fp16" and d["lr"]["warning"]
    assert d["warmup"]["warmup_optimizer_steps"] == 100 // d["best"]["accumulation"]
    rc, out, err = _cli(capsys, "--gpu", "t4", "--model", "mlp", "--effective-batch", "4",
                        "--checkpointing", "none", "--no-confirm")
    assert rc == 0, err
    assert "ESTIMATES" in out and "Best (estimated)" in out


def test_cli_third_party_model_and_errors(capsys, tmp_path, monkeypatch):
    (tmp_path / "thirdparty_models.py").write_text(textwrap.dedent("""
        import torch
        def small_cnn():
            return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                       torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 7))
        def broken():
            raise RuntimeError("no weights here")
        def bad_batch(b):
            raise KeyError("dataset")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["--gpu", "v100-16gb", "--effective-batch", "4", "--no-confirm", "--json"]
    rc, out, err = _cli(capsys, "--model", "thirdparty_models:small_cnn", "--input-shape",
                        "3,16,16", *base)
    assert rc == 0, err
    assert json.loads(out)["best"]["fits"]
    cases = [
        (["--gpu", "v200-99gb", "--model", "mlp", "--effective-batch", "4"], "unknown GPU"),
        (["--model", "no_such_pkg.models:build", "--input-shape", "3,16,16", *base],
         "cannot import"),
        (["--model", "thirdparty_models:broken", "--input-shape", "3,16,16", *base],
         "no weights here"),
        (["--model", "thirdparty_models:small_cnn", "--batch-fn", "thirdparty_models:bad_batch",
          *base], "batch function"),
        (["--model", "thirdparty_models:small_cnn", "--batch-fn", "thirdparty_models:nothing",
          *base], "no function"),
        (["--model", "thirdparty_models:small_cnn", *base], "--input-shape"),
    ]
    for args, needle in cases:
        rc, out, err = _cli(capsys, *args)
        assert rc == 2 and needle in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err


def test_cli_model_args_reach_the_model(capsys):
    """--model-arg builds the built-in with that keyword: fused attention needs less memory than
    math at the same micro-batch, and the plan's code rebuilds the same model."""
    base = ["--gpu", "v100-16gb", "--model", "dcal-vit-tiny", "--effective-batch", "16",
            "--precision", "fp32", "--checkpointing", "none", "--no-confirm", "--json",
            "--model-arg", "img_size=64"]
    plans = {}
    for backend in ("math", "fused"):
        rc, out, err = _cli(capsys, *base, "--model-arg", f"attention_backend={backend}")
        assert rc == 0, err
        plans[backend] = json.loads(out)
    assert plans["fused"]["best"]["peak_allocated"] < plans["math"]["best"]["peak_allocated"]
    assert plans["fused"]["model"]["kwargs"] == {"img_size": 64, "attention_backend": "fused"}
    assert "build_model('dcal-vit-tiny', img_size=64, attention_backend='fused')" in \
        plans["fused"]["code"]
    assert "loss_fn(model(*x), y)" in plans["fused"]["code"]  # DCAL takes the image pair
    for bad, needle in ((["--model-arg", "attention_backend"], "expected KEY=VALUE"),
                        (["--model-arg", "no_such_option=1"], "no_such_option"),
                        (["--model-arg", "attention_backend=flash"], "attention_backend")):
        rc, out, err = _cli(capsys, *base, *bad)
        assert rc == 2 and needle in err, (bad, err)
        assert len(err.strip().splitlines()) == 1, err


def test_model_args_read_the_shells_spelling_of_booleans_and_none():
    """`--model-arg use_bn=false` reached the factory as the string 'false' (true): the plan was
    for the model with BatchNorm, silently."""
    from memprof.cli.recommend import parse_model_args
    got = parse_model_args(["use_bn=false", "bias=TRUE", "norm=none", "act=null", "depth=6",
                            "widths=[2, 4]", "backend=fused", "name='false'"])
    assert got == {"use_bn": False, "bias": True, "norm": None, "act": None, "depth": 6,
                   "widths": [2, 4], "backend": "fused", "name": "false"}


def test_a_gpu_given_as_a_size_has_no_speed_and_the_best_line_says_no_more(capsys):
    """A capacity instead of a GPU: no samples/s is estimated, and the best option's line ended
    in a dangling "reserved, "."""
    rc, out, err = _cli(capsys, "--gpu", "3GB", "--model", "mlp", "--effective-batch", "8")
    assert rc == 0, err
    (best,) = [line for line in out.splitlines() if line.startswith("Best (estimated)")]
    assert best.rstrip().endswith("GiB reserved") and "samples/s" not in best
