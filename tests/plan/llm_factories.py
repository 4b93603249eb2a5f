"""Llama-style LLM factories for the meta-device and LoRA tests (transformers, peft)."""
import torch

SEQ = 512
VOCAB = 32000


def llama_config(layers=32, hidden=4096, heads=32, ffn=11008):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, max_position_embeddings=4096,
                       attn_implementation="sdpa", use_cache=False)


def llama_7b():
    """A 6.7B-parameter Llama (the Llama-2-7B shape), fp32 weights, built by the caller's
    device context (memprof builds it on meta)."""
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM(llama_config())


def llama_7b_lora(rank=64, dtype=torch.bfloat16):
    """The same model in bf16 with LoRA adapters of rank 64 (fp32) on q/k/v/o, via peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    base = LlamaForCausalLM(llama_config()).to(dtype)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(base, cfg)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    return model


def tokens(batch_size, seq=SEQ):
    ids = torch.randint(0, VOCAB, (batch_size, seq))
    return {"input_ids": ids, "labels": ids}, None
