"""The replicas of published training setups (benchmarks/bert_2022_replica.py,
benchmarks/litgpt_replica.py) compute what the originals computed and keep alive what they
kept alive: checked on small real CPU tensors, by the bytes autograd saves."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from benchmark_scripts import load

bert_2022_replica = load("bert_2022_replica")
litgpt_replica = load("litgpt_replica")


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while fn() runs (what backward keeps)."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def test_softmax_saving_input_keeps_input_and_gives_softmax_gradient():
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    scores = x * 2.0
    n_ref, ref = saved_bytes(lambda: torch.softmax(scores, -1))
    n_old, old = saved_bytes(lambda: bert_2022_replica.SoftmaxSavingInput.apply(scores, -1))
    # PyTorch <= 1.10: output and input saved; today only the output
    assert n_ref == scores.numel() * 8
    assert n_old == 2 * scores.numel() * 8
    torch.testing.assert_close(old, ref)
    g = torch.randn_like(ref)
    (grad_ref,) = torch.autograd.grad(ref, x, g, retain_graph=True)
    (grad_old,) = torch.autograd.grad(old, x, g)
    torch.testing.assert_close(grad_old, grad_ref)
    assert torch.autograd.gradcheck(lambda t: bert_2022_replica.SoftmaxSavingInput.apply(t, -1),
                                    (torch.randn(3, 4, dtype=torch.float64,
                                                 requires_grad=True),))


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     attn_implementation="eager")
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).train()


def test_bert_2022_attention_same_result_one_more_scores_tensor_saved():
    b, t, heads = 3, 16, 4
    ids = torch.randint(0, 50, (b, t))
    today = _tiny_bert()
    n_today, out_today = saved_bytes(lambda: today(input_ids=ids).logits)
    old = bert_2022_replica.use_2022_attention(_tiny_bert())
    n_old, out_old = saved_bytes(lambda: old(input_ids=ids).logits)
    torch.testing.assert_close(out_old, out_today)
    # the softmax input (scores + extended mask, fp32 B x H x T x T) is what 2022 kept more
    assert n_old - n_today == b * heads * t * t * 4


@pytest.mark.parametrize("name, trainable", [
    ("phi-1.5", 1_572_864), ("stablelm-alpha-3b", 2_097_152), ("llama-2-7b", 4_194_304),
    ("llama-2-13b", 6_553_600)])
def test_litgpt_replica_trainable_parameters_match_the_table(name, trainable):
    model, _ = litgpt_replica.build(name, 64)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.module.cos.dtype == torch.float32


def _tiny_lit(mlp="GptNeoxMLP", norm="LayerNorm"):
    cfg = litgpt_replica.LitConfig(
        n_layer=2, n_head=4, n_embd=32, padded_vocab_size=96, intermediate_size=64,
        rotary_percentage=0.5, parallel_residual=mlp == "GptNeoxMLP", bias=True,
        lm_head_bias=False, shared_attention_norm=False, norm=norm, mlp=mlp, lora_dropout=0.0)
    torch.manual_seed(0)
    model = litgpt_replica.LitGPT(cfg, 300)
    model.register_buffer("cos", model.rope_cache()[0], persistent=False)
    model.register_buffer("sin", model.rope_cache()[1], persistent=False)
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n
    with torch.no_grad():
        for blk in model.h:
            blk.attn.attn.lora_A.normal_()
            blk.attn.attn.lora_B.normal_()
    return litgpt_replica.FabricBf16True(model.to(torch.bfloat16)), cfg


@pytest.mark.parametrize("mlp, norm", [("GptNeoxMLP", "LayerNorm"), ("LLaMAMLP", "RMSNorm")])
def test_litgpt_replica_step(mlp, norm):
    model, cfg = _tiny_lit(mlp, norm)
    ids, targets = litgpt_replica.make_batch_fn(cfg, 300)(2)
    logits = model(**ids)
    # chunks of 128 positions, cast to float32 by Fabric's bf16-true output conversion
    assert [c.shape[1] for c in logits] == [128, 128, 44]
    assert all(c.dtype == torch.float32 for c in logits)
    loss = litgpt_replica.chunked_loss(logits, targets)
    full = torch.cat(logits, dim=1)[:, :-1]
    ref = F.cross_entropy(full.reshape(-1, cfg.padded_vocab_size), targets[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    assert loss.litgpt_logits[0] is logits[0]       # held until the step ends
    loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_litgpt_lora_qkv_matches_dense_delta():
    """The conv1d + zero_pad path adds B @ A only to the query and value columns."""
    model, cfg = _tiny_lit()
    qkv = model.module.h[0].attn.attn.float()
    x = torch.randn(2, 5, cfg.n_embd)
    delta = torch.zeros(3 * cfg.n_embd, cfg.n_embd)
    r, c = cfg.lora_r, cfg.n_embd
    delta[:c] = qkv.lora_B[:c] @ qkv.lora_A[:r]
    delta[2 * c:] = qkv.lora_B[c:] @ qkv.lora_A[r:]
    expected = qkv.linear(x) + x @ delta.t() * qkv.scaling
    torch.testing.assert_close(qkv(x), expected, rtol=1e-4, atol=1e-4)


def test_rmsnorm_upcast_keeps_a_float32_copy():
    """lit-gpt #606's RMSNorm keeps a float32 copy of its input for backward, 8641822's the
    bf16 input itself: 4 instead of 2 bytes per element (+ the per-row rsqrt)."""
    b, t, c = 2, 8, 64
    x = (torch.randn(b, t, c) * 3).to(torch.bfloat16).requires_grad_()
    h = x * 1.0                                   # a non-leaf input, as in a block
    plain = litgpt_replica.RMSNorm(c, 1e-5).to(torch.bfloat16).requires_grad_(False)
    upcast = litgpt_replica.RMSNorm(c, 1e-5, upcast=True).to(torch.bfloat16)
    upcast.requires_grad_(False)
    n_plain, out_plain = saved_bytes(lambda: plain(h))
    n_upcast, out_upcast = saved_bytes(lambda: upcast(h))
    weight = c * 2
    assert n_plain == b * t * c * 2 + b * t * 2 + weight
    assert n_upcast == b * t * c * 4 + b * t * 4 + weight
    assert out_upcast.dtype == out_plain.dtype == torch.bfloat16
    torch.testing.assert_close(out_upcast, out_plain, rtol=2e-2, atol=2e-2)
