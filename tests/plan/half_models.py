"""Small models built in half precision, and a small T5, for the precision tests (importable
by the code a plan prints: `model="half_models:mlp_fp16"`)."""
import torch
import torch.nn as nn

VOCAB = 256


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                         nn.Linear(128, 10))


def mlp_fp16():
    """An MLP built with .half(): its weights, gradients and optimizer state are fp16."""
    return _mlp().half()


def mlp_bf16():
    return _mlp().to(torch.bfloat16)


def batch_fp16(batch_size=32):
    return torch.randn(batch_size, 64, dtype=torch.float16), torch.randint(0, 10, (batch_size,))


def batch_bf16(batch_size=32):
    return torch.randn(batch_size, 64, dtype=torch.bfloat16), torch.randint(0, 10, (batch_size,))


def llama_lora_bf16(rank=8):
    """A 2-layer Llama in bf16 with fp32 LoRA adapters on q/v (peft): the 7B recipe, small."""
    from tiny_mlp import lora_llama
    return lora_llama(rank, vocab=VOCAB)


def tokens(batch_size=4, seq=32):
    ids = torch.randint(0, VOCAB, (batch_size, seq))
    return {"input_ids": ids, "labels": ids}


def t5():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        num_layers=2, num_decoder_layers=2, d_model=64, d_ff=128, num_heads=4, d_kv=16,
        vocab_size=VOCAB, decoder_start_token_id=0))


def t5_batch(batch_size=8):
    return {"input_ids": torch.randint(0, VOCAB, (batch_size, 32)),
            "labels": torch.randint(0, VOCAB, (batch_size, 16))}
