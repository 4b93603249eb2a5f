"""`memprof recommend` when estimates fail: a checkpointing policy that cannot run on the
model is named with its error in whole words, "nothing fits" is not said when nothing could be
estimated (exit 1), and Hugging Face's GPT-2 (its cache passed by position) is estimated under
the selective policy (it raised "aten.slice.Tensor encountered during backward")."""
import json
import textwrap

import pytest

from memprof.cli import main

MODULE = textwrap.dedent("""
    import torch
    import torch.nn as nn

    class Flipping(nn.Module):
        '''Runs another op at every call: the recompute differs from the forward.'''
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            x = x.sin() if self.calls % 2 else x.cos()
            return self.lin(x)     # saves its input: the recompute must run sin again

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Flipping() for _ in range(3)])
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.head(x)

    def batch(batch_size=8):
        return torch.randn(batch_size, 16), torch.randint(0, 4, (batch_size,))

    def gpt2():
        from transformers import GPT2Config, GPT2LMHeadModel
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100,
                                          n_positions=64, bos_token_id=0, eos_token_id=0))

    def tokens(batch_size=8):
        ids = torch.randint(0, 100, (batch_size, 64))
        return {"input_ids": ids, "labels": ids}
""")


@pytest.fixture
def models_dir(user_module):
    return user_module("failing_models_cli", MODULE)


def _cli(capsys, *args):
    rc = main(["recommend", "--gpu", "a100-80gb", "--workers", "1", "--precision", "fp32",
               *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_only_failing_estimates_is_not_nothing_fits(models_dir, capsys):
    rc, out, _ = _cli(capsys, "--model", "failing_models_cli:Net",
                      "--batch-fn", "failing_models_cli:batch", "--checkpointing", "selective")
    text = " ".join(out.split())
    assert rc == 1
    assert "No combination could be estimated" in text and "Nothing fits" not in text
    # the error in whole words (it was cut at 160 characters: "... or dep")
    assert ("fp32/selective: estimate failed: RuntimeError: aten.cos.default encountered "
            "during backward but not found in storage. This can happen if the operations in "
            "the checkpointed region are nondeterministic or depend on global state that "
            "changed between forward and backward.") in text


def test_some_failing_estimates_still_give_advice(models_dir, capsys):
    rc, out, _ = _cli(capsys, "--model", "failing_models_cli:Net",
                      "--batch-fn", "failing_models_cli:batch",
                      "--checkpointing", "every,selective", "--json")
    plan = json.loads(out)
    errors = {c["checkpointing"]: c["error"] for c in plan["combinations"]}
    assert rc == 0 and plan["best"]["checkpointing"] == "every" and errors["every"] is None
    assert errors["selective"].endswith("changed between forward and backward.")


def test_gpt2_selective_is_estimated(models_dir, capsys):
    pytest.importorskip("transformers")
    rc, out, _ = _cli(capsys, "--model", "failing_models_cli:gpt2",
                      "--batch-fn", "failing_models_cli:tokens", "--checkpointing",
                      "selective", "--json")
    plan = json.loads(out)
    (combo,) = plan["combinations"]
    assert rc == 0 and combo["error"] is None and combo["max_micro_batch"] >= 8
    assert plan["best"]["checkpointing"] == "selective"
