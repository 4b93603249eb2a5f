"""A checkpointed block that is handed a KV cache (a Hugging Face decoder in training keeps
use_cache=True) runs without it, as Hugging Face's own checkpointed layers do: otherwise it
writes the cache in the forward and again in the recompute, and torch.utils.checkpoint raises
"a different number of tensors was saved"."""
import torch
import torch.nn as nn
import pytest

import memprof
from memprof.plan.estimate import Estimator

tf = pytest.importorskip("transformers")
V = 1000


def _t5():
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=V, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                      decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)
    return tf.T5ForConditionalGeneration(cfg).train()


def _batch(bs=2):
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, V, (bs, 16), generator=g),
            "labels": torch.randint(0, V, (bs, 8), generator=g)}


def test_checkpointed_t5_trains_with_the_same_gradients():
    model, batch = _t5(), _batch()
    model(**batch).loss.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with memprof.checkpoint.apply(model, "every") as handle:
        # both stacks (the encoder's was left out when only the largest was taken)
        assert handle.container == "encoder.block,decoder.block" and len(handle.wrapped) == 4
        model(**batch).loss.backward()
    # the same up to rounding: with transformers 5.25 every gradient is within ~5e-8 of the
    # plain run's, not bit for bit (Hugging Face's own checkpointing is no closer)
    for p, ref in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-7)


def test_checkpointed_t5_can_be_estimated():
    model = _t5()
    est = Estimator(model, lambda bs: (_batch(bs), None), gpu="a100-80gb")
    plain = est.step(2)
    every = est.step(2, checkpointing="every")   # raised CheckpointError before
    assert every.peak_allocated <= plain.peak_allocated
    assert every.flops > plain.flops            # the blocks are recomputed


class _Reader(nn.Module):
    """A block that only reads its cache may keep it."""
    _can_checkpoint_with_cache = True

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.seen = []

    def forward(self, x, past_key_values=None, use_cache=False):
        self.seen.append((past_key_values is not None, use_cache))
        return self.lin(x) + (past_key_values if past_key_values is not None else 0)


def test_the_cache_is_dropped_only_under_checkpointing_with_gradients():
    blocks = nn.ModuleList([_Reader(), _Reader()])
    cache = torch.ones(4)
    x = torch.randn(2, 4, requires_grad=True)
    with memprof.checkpoint.apply(blocks, "every", blocks=list(blocks)):
        blocks[0](x, past_key_values=cache, use_cache=True).sum().backward()
        with torch.no_grad():
            blocks[1](x, past_key_values=cache, use_cache=True)
    # a reader keeps the cache; use_cache is turned off under checkpointing (forward and
    # recompute), not under no_grad
    assert blocks[0].seen == [(True, False), (True, False)]
    assert blocks[1].seen == [(True, True)]
    blocks[0].seen.clear()
    _Reader._can_checkpoint_with_cache = False
    try:
        with memprof.checkpoint.apply(blocks, "every", blocks=list(blocks)):
            blocks[0](x, past_key_values=cache, use_cache=True).sum().backward()
    finally:
        _Reader._can_checkpoint_with_cache = True
    assert blocks[0].seen == [(False, False), (False, False)]


def _gpt2():
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=V, n_positions=32,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    return tf.GPT2LMHeadModel(cfg).train()


@pytest.mark.parametrize("policy", ["every", "selective"])
def test_checkpointed_gpt2_gets_its_positional_cache_dropped(policy):
    """GPT-2's model hands each block its cache as the second positional argument: the
    selective policy raised "aten.slice.Tensor encountered during backward but not found in
    storage" (the recompute read the keys the forward had written)."""
    model, batch = _gpt2(), _batch()
    batch["labels"] = batch["input_ids"]
    model(**batch).loss.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with memprof.checkpoint.apply(model, policy) as handle:
        assert handle.container == "transformer.h" and len(handle.wrapped) == 2
        model(**batch).loss.backward()
    for p, ref in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-6)


def test_a_positional_cache_is_dropped_and_other_arguments_kept():
    class Writer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.seen = []

        def forward(self, x, cache=None, scale=1.0):
            self.seen.append((cache is not None, scale))
            return self.lin(x) * scale

    blocks = nn.ModuleList([Writer(), Writer()])
    x = torch.randn(2, 4, requires_grad=True)
    with memprof.checkpoint.apply(blocks, "every", blocks=list(blocks)):
        blocks[0](x, (torch.ones(4), torch.ones(4)), 2.0).sum().backward()
    assert blocks[0].seen == [(False, 2.0), (False, 2.0)]


def test_a_tensor_named_cache_is_passed_on():
    """`cache` is also what blocks call a table they only read (rotary angles): a tensor
    there is not a KV cache (those are cache objects or tuples) and is passed on; dropping
    it took another branch of the block, and its results changed without a word."""
    class Rotary(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, cache=None):
            y = self.lin(x)
            return y * cache if cache is not None else y

    torch.manual_seed(0)
    blocks = nn.ModuleList([Rotary(), Rotary()])
    x, table = torch.randn(2, 4), torch.randn(4)
    plain = blocks[0](x, table)
    plain.sum().backward()
    expected = blocks[0].lin.weight.grad.clone()
    blocks.zero_grad()
    with memprof.checkpoint.apply(blocks, "every", blocks=list(blocks)):
        out = blocks[0](x, cache=table)
        out.sum().backward()
        torch.testing.assert_close(out, plain)
        torch.testing.assert_close(blocks[0].lin.weight.grad, expected)
        blocks.zero_grad()
        blocks[0](x, table).sum().backward()
        torch.testing.assert_close(blocks[0].lin.weight.grad, expected)
