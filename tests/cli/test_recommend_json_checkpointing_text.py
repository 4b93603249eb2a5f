"""`memprof recommend --json`: each option and the best one carry `checkpointing_text`, the
checkpointing as the table shows it. Only the combinations had it: a script reading the best
option of a model that checkpoints its own blocks got checkpointing 'none' and had to work
"model's own" out of own_checkpointing / policy_applied itself."""
import json
import sys
import textwrap

import pytest

from memprof.cli import main

pytest.importorskip("transformers", reason="transformers is not installed")

MODULE = textwrap.dedent("""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama():   # activation checkpointing on in its config, as a saved model may have it
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
            use_cache=False, gradient_checkpointing=True))

    def tokens(batch_size=8):
        ids = torch.randint(0, 128, (batch_size, 64))
        return {"input_ids": ids, "labels": ids}
""")


def test_the_best_option_and_each_option_say_model_s_own_in_the_json(capsys, tmp_path,
                                                                      monkeypatch):
    (tmp_path / "own_ckpt_llama.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "own_ckpt_llama", raising=False)
    rc = main(["recommend", "--gpu", "a100-40gb", "--model", "own_ckpt_llama:llama",
               "--batch-fn", "own_ckpt_llama:tokens", "--precision", "bf16",
               "--checkpointing", "none,every", "--no-confirm", "--workers", "1", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    plan = json.loads(out)
    best = plan["best"]
    assert best["own_checkpointing"] and best["checkpointing"] == "none"
    assert best["checkpointing_text"] == "model's own", best
    assert plan["options"] and all(o["checkpointing_text"] == "model's own"
                                   for o in plan["options"])
    # the combinations said it already; the best option now says the same
    none = next(c for c in plan["combinations"] if c["checkpointing"] == "none")
    assert none["checkpointing_text"] == best["checkpointing_text"]
