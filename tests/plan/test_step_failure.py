"""A training step that fails in recommend says what raised it: the model's own error (T5
without a decoder start token raises it eagerly too) was reported as "a training step failed
under fake tensors", and the user hunted a fake-tensor problem that did not exist."""
import sys

import pytest
import torch
from torch import nn

import memprof
from memprof import cli
from memprof.plan.errors import PlanInputError

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def t5_without_start_token():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_decoder_layers=2, num_heads=4, decoder_start_token_id=None,
                                pad_token_id=None)
    return transformers.T5ForConditionalGeneration(cfg)


def tokens(batch_size=4):
    ids = torch.randint(0, 64, (batch_size, 16))
    return {"input_ids": ids, "labels": ids}


def _plan_error(model, batch) -> str:
    with pytest.raises(PlanInputError) as err:
        memprof.recommend(model, batch=batch, gpu="a100-40gb", effective_batch=4,
                          precisions=["fp32"], policies=["none"], workers=1, confirm=False)
    return str(err.value)


def test_the_models_own_error_is_named_as_the_models_with_a_hint():
    said = _plan_error(t5_without_start_token, tokens)
    lines = said.splitlines()
    assert len(lines) == 2, said
    assert "ValueError: self.model.config.decoder_start_token_id has to be defined" in lines[0]
    assert "under fake tensors" not in said and "model's own code" in lines[0]
    assert "modeling_t5.py:" in lines[0]
    assert lines[1].startswith("hint:") and "tokens(2)" in lines[1] and "model(**x)" in lines[1]


def test_the_cli_says_the_same(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "t5_start_token", sys.modules[__name__])
    rc = cli.main(["recommend", "--gpu", "a100-40gb", "--model",
                   "t5_start_token:t5_without_start_token", "--batch-fn",
                   "t5_start_token:tokens", "--precision", "fp32", "--checkpointing", "none",
                   "--workers", "1", "--no-confirm"])
    err = capsys.readouterr().err
    assert rc == 2 and "ValueError" in err and "model's own code" in err, err
    assert "under fake tensors" not in err and "hint:" in err


class WrongWidth(nn.Module):
    """Raises inside torch (a shape mismatch), eagerly as under fake tensors."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 8), nn.Linear(16, 4))

    def forward(self, x):
        return self.layers(x)


def wrong_width_batch(b):
    return torch.randn(b, 8), torch.randint(0, 4, (b,))


def test_an_error_inside_torch_that_a_plain_step_raises_too_is_the_models():
    said = _plan_error(WrongWidth(), wrong_width_batch)
    assert "RuntimeError" in said and "under fake tensors" not in said, said
    assert "plain step" in said.splitlines()[0]


class ReadsAValue(nn.Module):
    """Branches on a tensor's value: runs eagerly, cannot run on fake tensors."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))

    def forward(self, x):
        h = self.layers[0](x)
        if h.sum() > 0:
            h = h * 2
        return self.layers[1](h)


def test_a_real_fake_tensor_failure_still_says_fake_tensors():
    model = ReadsAValue()
    said = _plan_error(model, wrong_width_batch)
    assert "under fake tensors" in said and "plain step" in said, said
    assert all(p.grad is None for p in model.parameters())   # the plain step ran on a copy


# --------------------------------------------- a first policy other than "none" (issue 1)
def _plan_error_with(model, batch, policies) -> str:
    with pytest.raises(PlanInputError) as err:
        memprof.recommend(model, batch=batch, gpu="a100-40gb", effective_batch=4,
                          precisions=["fp32"], policies=policies, workers=1, confirm=False)
    return str(err.value)


@pytest.mark.parametrize("policies", [["every"], ["every", "selective"]])
def test_without_none_the_models_own_error_is_named_the_same(policies):
    """--checkpointing every (no 'none'): each row read 'estimate failed: ValueError ...',
    and the plan said no combination could be estimated - no hint, no 'the model's own'."""
    assert _plan_error_with(t5_without_start_token, tokens, policies) == \
        _plan_error(t5_without_start_token, tokens)


def test_the_cli_names_it_with_checkpointing_every(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "t5_start_token", sys.modules[__name__])
    rc = cli.main(["recommend", "--gpu", "a100-40gb", "--model",
                   "t5_start_token:t5_without_start_token", "--batch-fn",
                   "t5_start_token:tokens", "--precision", "fp32", "--checkpointing",
                   "every,selective", "--workers", "1", "--no-confirm"])
    err = capsys.readouterr().err
    assert rc == 2 and "ValueError" in err and "model's own code" in err, err
    assert "hint:" in err and "estimate failed" not in err


class OnceAStep(nn.Linear):
    """Its own code raises when it runs twice in one step (its model resets `ran`)."""

    def forward(self, x):
        if self.ran and torch.is_grad_enabled():
            raise RuntimeError("a block ran twice in one step")
        self.ran = True
        return super().forward(x)


class FailsWhenRecomputed(nn.Module):
    """Fine without checkpointing; fails only in a checkpointed block's recompute."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(OnceAStep(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for blk in self.blocks:
            blk.ran = False
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def test_an_error_of_the_checkpointed_step_alone_stays_on_its_row():
    """A step that fails only under memprof's checkpointing is not the model's own error:
    the plain step runs, so the row keeps it and the plan is returned."""
    from memprof.plan.search import recommend
    plan = recommend(FailsWhenRecomputed(), batch=wrong_width_batch, gpu="a100-40gb",
                     effective_batch=4, precisions=["fp32"], policies=["every"], workers=1,
                     confirm=False, blocks="blocks")
    [c] = plan.combinations
    assert c.model is None and c.error and "estimate failed" in c.error, c.error


def batch_of_three(b):
    return torch.randn(b, 8), torch.randint(0, 4, (b,)), torch.ones(b)


def test_a_batch_the_forward_cannot_take_names_the_batch_function():
    """(x, y, w) is all inputs, model(*x): 'its training step raises TypeError: ...forward()
    takes 2 positional arguments but 4 were given' blamed the model."""
    said = _plan_error(nn.Sequential(nn.Linear(8, 4)), batch_of_three)
    assert said.startswith("batch function 'batch_of_three' returned a tuple of 3"), said
    assert "model(*x)" in said and "takes 1 input (input)" in said and "\n" not in said
