"""The small models several tests share (a plain module: importable from any test folder)."""
import torch


class MLP(torch.nn.Module):
    """Linear(D,H) -> ReLU -> Linear(H,C): activation sizes are easy to compute by hand."""

    def __init__(self, d=64, h=128, c=10):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, h)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(h, c)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LoRALinear(torch.nn.Module):
    """A frozen Linear(d, d) plus a trainable rank-r update, as LoRA adds one (its a starts
    small and b at zero)."""

    def __init__(self, d, r=4):
        super().__init__()
        self.base = torch.nn.Linear(d, d)
        self.base.requires_grad_(False)
        self.a = torch.nn.Parameter(torch.randn(d, r) * 0.01)
        self.b = torch.nn.Parameter(torch.zeros(r, d))

    def forward(self, x):
        return self.base(x) + (x @ self.a) @ self.b


def lora_llama(rank=8, vocab=256, tie_word_embeddings=False):
    """A 2-layer Llama (random weights), its base in bf16 and frozen by peft, fp32 LoRA
    adapters on q/v: the 7B LoRA recipe, small."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings, use_cache=False)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank,
                                            target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    return model
