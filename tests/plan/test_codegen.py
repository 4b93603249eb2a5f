"""The plan's code (memprof.plan.codegen): a built-in model with the user's own loss or batch
function keeps them (build_model's own must not rebind the imported names)."""
import torch.nn as nn

import memprof


def _code(**kw) -> str:
    return memprof.recommend("mlp", gpu="a100-40gb", effective_batch=8, policies=["none"],
                             precisions=["bf16"], confirm=False, workers=1, **kw).code()


def test_builtin_model_brings_its_batch_and_loss():
    assert "model, make_batch, loss_fn = memprof.models.build_model('mlp')" in _code()


def test_builtin_model_with_the_users_loss_keeps_it():
    code = _code(loss=nn.functional.cross_entropy)
    assert "from torch.nn.functional import cross_entropy as loss_fn" in code
    assert "model, make_batch, _ = memprof.models.build_model('mlp')" in code


def test_builtin_model_with_the_users_batch_function_keeps_it(tmp_path, monkeypatch):
    (tmp_path / "mlp_batches.py").write_text(
        "import torch\n"
        "def batch(b):\n"
        "    return (torch.randn(b, 784),), torch.randint(0, 10, (b,))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = _code(batch="mlp_batches:batch")
    assert "from mlp_batches import batch as make_batch" in code
    assert "model, _, loss_fn = memprof.models.build_model('mlp')" in code


def test_without_an_optimizer_the_code_runs_and_changes_nothing():
    """--optimizer none printed `opt = ...` and then `opt.step()`."""
    import torch
    plan = memprof.recommend("mlp", gpu="a100-40gb", effective_batch=8, policies=["none"],
                             precisions=["fp32"], optimizer="none", confirm=False, workers=1)
    code = plan.code()
    assert "opt = ..." not in code and "lr=0.0" in code
    ns: dict = {}
    exec(compile(code, "<plan code>", "exec"), ns)
    assert torch.isfinite(ns["loss"]).all() and not ns["opt"].state   # no state was made


def pair_without_targets(batch_size=2):
    ids = __import__("torch").randint(0, 50, (batch_size, 8))
    return {"input_ids": ids, "labels": ids}, None


def test_a_batch_of_inputs_and_no_targets_is_unpacked_in_the_code():
    """A batch function returning `(inputs, None)` (an LLM's tokens with their labels inside)
    got code that called model(**x) on the whole pair: a TypeError."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    plan = memprof.recommend(model, gpu="a100-40gb", effective_batch=4,
                             batch=pair_without_targets, policies=["none"],
                             precisions=["fp32"], confirm=False, workers=1)
    code = plan.code()
    assert "for i, (x, _) in enumerate(loader):" in code
    ns: dict = {"model": model}
    exec(compile(code.replace("model = ", "_unused = ", 1)
                 if "model = ..." in code else code, "<plan code>", "exec"), ns)
    assert torch.isfinite(ns["loss"]).all()
