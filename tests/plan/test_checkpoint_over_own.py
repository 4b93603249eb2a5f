"""memprof.checkpoint.apply on a model that checkpoints its blocks itself (Hugging Face's
activation checkpointing) wrapped them a second time: each block ran three times a step
(forward, memprof's recompute, the model's own reentrant recompute inside it). Such blocks are left to
the model's own checkpointing, and apply says so once."""
import warnings

import pytest
import torch

import memprof

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=32,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg).train()


def _own_on(model):
    """Reentrant, as transformers 4.x did by default (5.x: non-reentrant, which torch nests
    without a second recompute): each block is then run a third time under memprof's."""
    kw = {"use_reentrant": True}
    with warnings.catch_warnings():      # the older name warns in transformers 5.x
        warnings.simplefilter("ignore", FutureWarning)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def _mlp_runs_per_step(model) -> int:
    """How often the first layer's MLP runs in one forward + backward (counted in its
    forward: module hooks do not run in a recompute)."""
    calls, mlp = [], model.model.layers[0].mlp
    inner = mlp.forward
    mlp.forward = lambda *a, **kw: (calls.append(1), inner(*a, **kw))[1]
    ids = torch.randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    del mlp.forward
    return len(calls)


def test_blocks_that_checkpoint_themselves_are_not_wrapped_again():
    model = _llama()
    _own_on(model)
    assert _mlp_runs_per_step(model) == 2                       # the model's own: once more
    with pytest.warns(UserWarning, match="checkpoint themselves") as said:
        handle = memprof.checkpoint.apply(model, "every")
    assert len(said) == 1 and "3 of 3 blocks" in str(said[0].message)
    assert handle.wrapped == [] and len(handle.skipped) == 3
    assert _mlp_runs_per_step(model) == 2                       # not a second recompute
    handle.remove()


def test_a_block_whose_own_checkpointing_is_turned_on_later_runs_it_alone():
    """The order of a Trainer with gradient_checkpointing=True: memprof's policy applied
    first, the model's own turned on when training starts."""
    model = _llama()
    handle = memprof.checkpoint.apply(model, "every")
    assert len(handle.wrapped) == 3 and _mlp_runs_per_step(model) == 2
    _own_on(model)
    with pytest.warns(UserWarning, match="checkpoint themselves") as said:
        assert _mlp_runs_per_step(model) == 2
        _mlp_runs_per_step(model)
    assert len(said) == 1                                       # said once
    handle.remove()


def test_without_the_models_own_checkpointing_every_block_is_wrapped():
    model = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = memprof.checkpoint.apply(model, "every")
    assert len(handle.wrapped) == 3 and handle.skipped == []
    assert _mlp_runs_per_step(model) == 2
