"""Checkpointing an encoder-decoder: both stacks of blocks, not the largest one alone (a new-user
sweep: "every" on a T5 covered its decoder only, and the encoder, most of the activations at
sequence 512 against 128, stayed; naming both was refused)."""
import torch
from torch import nn

import memprof
from memprof.plan.checkpoint import apply, find_blocks, resolve_blocks

D = 32


class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x):
        return x + self.ff(x)


class DecoderLayer(EncoderLayer):
    """Another type, as BART's are (T5's stacks share one)."""

    def __init__(self):
        super().__init__()
        self.cross = nn.Linear(D, D)

    def forward(self, x, memory):
        return super().forward(x) + self.cross(memory.mean(1, keepdim=True))


class Seq2Seq(nn.Module):
    def __init__(self, n_enc=4, n_dec=3):
        super().__init__()
        self.embed = nn.Embedding(50, D)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([EncoderLayer() for _ in range(n_enc)])
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList([DecoderLayer() for _ in range(n_dec)])
        # two small heads: a repeated pair, but not a stack worth checkpointing
        self.heads = nn.ModuleList([nn.Linear(D, 50), nn.Linear(D, 50)])

    def forward(self, src, tgt):
        memory = self.embed(src)
        for layer in self.encoder.layers:
            memory = layer(memory)
        x = self.embed(tgt)
        for layer in self.decoder.layers:
            x = layer(x, memory)
        return self.heads[0](x) + self.heads[1](x)


def test_both_stacks_are_found_in_the_model_s_order_and_the_heads_are_not():
    model = Seq2Seq()
    name, blocks = find_blocks(model)
    assert name == "encoder.layers,decoder.layers"
    assert blocks == list(model.encoder.layers) + list(model.decoder.layers)


def test_one_stack_is_found_alone():
    model = nn.Sequential(nn.Linear(D, D), nn.ModuleList([EncoderLayer() for _ in range(4)]))
    name, blocks = find_blocks(model)
    assert name == "1" and len(blocks) == 4


def test_several_stacks_can_be_named_and_checkpointing_covers_both():
    model = Seq2Seq()
    name, blocks = resolve_blocks(model, "encoder.layers, decoder.layers")
    assert blocks == list(model.encoder.layers) + list(model.decoder.layers)
    src, tgt = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 5))
    with apply(model, "every") as handle:
        assert handle.wrapped == blocks
        with memprof.track(model) as prof:
            model(src, tgt).sum().backward()
    assert prof.peak > 0


def test_a_plan_checkpoints_both_stacks():
    def batch(batch_size=4):
        return {"src": torch.randint(0, 50, (batch_size, 64)),
                "tgt": torch.randint(0, 50, (batch_size, 8))}
    plan = memprof.recommend(Seq2Seq(), batch=batch, gpu="v100-16gb", effective_batch=8,
                             precisions=["fp32"], policies=["every"], confirm=False)
    assert "model.encoder.layers, model.decoder.layers (7 blocks)" in plan.code()
