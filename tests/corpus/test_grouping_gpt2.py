"""One finding per root holder (issue 14): GPT-2 outputs kept in a list, KV cache included,
are one finding for `history` listing the paths inside, with fix text for a KV cache; and the
rules behind it (root holders; the last iteration of loops with several optimizers)."""
import pytest
import torch

import memprof

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def test_gpt2_outputs_kept_in_a_list_are_one_finding_for_history():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2,
                                  n_head=2, use_cache=True)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps, batch, seq = 4, 2, 16
    with memprof.track(model, opt) as prof:
        history = []
        for _ in range(steps):
            ids = torch.randint(0, 64, (batch, seq))
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            history.append(out)
    found = [f for f in prof.findings if f.kind == "retained_graph"]
    assert len(found) == 1, [(f.holder, f.evidence.get("example_path")) for f in found]
    f = found[0]
    assert f.holder.split(" and ")[0].endswith("<locals>.history")
    paths = f.evidence["paths"]
    assert len(paths) >= 2 * cfg.n_layer and all(p.split("[")[0].endswith("history") for p in paths)
    assert "use_cache=False" in f.fix
    # each earlier step's output, summed once: keys and values of every layer, logits, loss
    kv = cfg.n_layer * 2 * batch * seq * cfg.n_embd * 4
    logits = batch * seq * cfg.vocab_size * 4
    expected = (steps - 1) * (kv + logits + 4)
    assert abs(f.bytes - expected) <= 0.1 * expected, (f.bytes, expected)


def test_root_holder_is_the_reference_to_change():
    from memprof.analyse.leaks import root_holder
    assert root_holder("f.<locals>.history[0]['past_key_values'].layers[1].keys") == \
        "f.<locals>.history"
    assert root_holder("model.blocks.3.attn.maps[11]") == "model.blocks.3.attn.maps"
    assert root_holder("f.<locals>.logs[2].<closure out>") == "f.<locals>.logs"
    assert root_holder("f.<locals>.h") == "f.<locals>.h"


def test_last_round_spans_one_step_of_each_optimizer():
    from memprof.analyse.turns import last_round_start
    d, g = 11, 22
    assert last_round_start([d, g, d, g, d, g], 5) == 4      # a GAN: D's step and G's step
    assert last_round_start([d] * 6, 5) == 5                  # one optimizer: the last step
    assert last_round_start([d, g, d, d, g, d, d], 6) == 4    # G steps rarely: since its step
    assert last_round_start([0, 0, 0], 2) == 2                # prof.step() / auto steps
    assert last_round_start([0, d, d, d], 3) == 3             # a one-off step takes no turn
