"""The DCAL reference model and the other built-in workloads (memprof.models).

The fused backend runs `memprof.tritonkernels.attention`; in this process that is its PyTorch
CPU path (TRITON_INTERPRET is removed from the environment for those tests). One test runs the
model on the real Triton kernels through the interpreter, in a subprocess (see
tests/test_attention_kernels.py for why a subprocess).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from memprof.models import MODELS, build_model, training_step
from memprof.models.dcal import DCAL, attention_rollout


@pytest.fixture(autouse=True)
def _torch_fallback(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _pair(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    x1 = torch.randn(batch, c.in_chans, c.img_size, c.img_size, generator=g)
    x2 = torch.randn(batch, c.in_chans, c.img_size, c.img_size, generator=g)
    y = torch.randint(0, c.num_classes, (batch,), generator=g)
    return x1, x2, y


def _twins(**overrides):
    """The same random weights in a math and a fused DCAL."""
    math_m = build_model("dcal-vit-tiny", attention_backend="math", **overrides).model
    fused_m = build_model("dcal-vit-tiny", attention_backend="fused", **overrides).model
    fused_m.load_state_dict(math_m.state_dict())
    return math_m, fused_m


def test_registry_lists_workloads():
    assert set(MODELS) >= {"mlp", "resnet-tiny", "vit-tiny", "vit-b16", "dcal-vit-tiny",
                           "dcal-vit-b16"}
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope")
    with pytest.raises(TypeError, match="dcal-vit-tiny"):
        build_model("dcal-vit-tiny", not_an_option=1)


@pytest.mark.parametrize("name", ["mlp", "resnet-tiny", "vit-tiny", "dcal-vit-tiny"])
def test_small_workloads_train(name):
    model, make_batch, loss_fn = build_model(name)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = make_batch(4)
    assert isinstance(batch[0], tuple)
    losses = [float(training_step(model, batch, loss_fn, opt)) for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


def test_dcal_shapes_train_and_eval():
    model = build_model("dcal-vit-tiny").model
    x1, x2, _ = _pair(model, batch=3)
    model.train()
    out = model(x1, x2)
    assert set(out) == {"sa", "glca", "pwca"}
    assert all(v.shape == (3, 10) for v in out.values())
    R = model.num_selected
    assert R == 2 and model.num_tokens == 17
    idx = model.glca_index
    assert idx.shape == (3, 1 + R) and bool((idx[:, 0] == 0).all())
    assert all(len(set(row.tolist())) == 1 + R for row in idx)
    assert len(model.sa_attention_history) == model.cfg.depth
    assert model.sa_attention_history[0].shape == (3, 2, 17, 17)  # math: per-head maps
    model.eval()
    with torch.no_grad():
        out = model(x1, x2)  # x2 is ignored in eval
    assert set(out) == {"sa", "glca"}
    probs = model.predict(x1)
    assert torch.allclose(probs.sum(-1), torch.ones(3))


@pytest.mark.parametrize("train", [True, False])
def test_math_and_fused_agree(train):
    math_m, fused_m = _twins()
    x1, x2, y = _pair(math_m)
    results = []
    for m in (math_m, fused_m):
        m.train(train)
        out = m(x1, x2)
        loss = m.compute_loss(out, y)
        loss.backward()
        results.append((out, loss, {n: p.grad for n, p in m.named_parameters()}, m.glca_index))
    (o1, l1, g1, i1), (o2, l2, g2, i2) = results
    assert torch.equal(i1, i2)
    assert set(o1) == set(o2)
    for k in o1:
        torch.testing.assert_close(o2[k], o1[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    for n in g1:
        assert (g1[n] is None) == (g2[n] is None), n
        if g1[n] is not None:
            torch.testing.assert_close(g2[n], g1[n], rtol=1e-3, atol=1e-5, msg=n)
    assert (g1["pwca_head.weight"] is None) == (not train)
    # fused folds the head-averaged maps into the rollout block by block, without a graph:
    # the same rollout as math's from its kept per-head maps
    assert fused_m.sa_attention_history == []
    assert fused_m.attention_rollout.grad_fn is None
    torch.testing.assert_close(fused_m.attention_rollout, math_m.attention_rollout,
                               rtol=1e-4, atol=1e-6)


def test_pwca_with_identical_pair_equals_sa():
    """Keys/values [K1; K1] give the same softmax average as K1 alone: PWCA == SA then."""
    model = build_model("dcal-vit-tiny").model.train()
    model.pwca_head.load_state_dict(model.head.state_dict())
    x1, _, _ = _pair(model)
    out = model(x1, x1.clone())
    torch.testing.assert_close(out["pwca"], out["sa"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["math", "fused"])
def test_glca_rows_match_full_block(backend):
    """GLCA on selected rows returns exactly those rows of the block applied to all tokens."""
    model = build_model("dcal-vit-tiny", attention_backend=backend).model.eval()
    x = torch.randn(2, 17, 64)
    idx = torch.stack([torch.randperm(17)[:5] for _ in range(2)])
    with torch.no_grad():
        full, _, _ = model.glca_block(x)
        rows, _, _ = model.glca_block(x, q_index=idx)
    torch.testing.assert_close(rows, torch.gather(full, 1, idx[..., None].expand(-1, -1, 64)),
                               rtol=1e-4, atol=1e-5)


def test_rollout_properties():
    a = torch.softmax(torch.randn(2, 5, 5), -1)
    r = attention_rollout([a, a])
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 5))
    a_hat = 0.5 * a + 0.5 * torch.eye(5)
    torch.testing.assert_close(r, a_hat @ a_hat)


def test_bug_switch_keeps_graphs_alive():
    model = build_model("dcal-vit-tiny", detach_history=False).model.train()
    x1, x2, y = _pair(model)
    loss = model.compute_loss(model(x1, x2), y)
    loss.backward()
    hist = model.sa_attention_history
    assert hist and all(h.grad_fn is not None for h in hist)
    assert model.attention_rollout.grad_fn is not None
    # after the training step, the rollout graph (and every SA map's graph) is still alive:
    # it can be differentiated - i.e. its saved tensors were never freed
    g = torch.autograd.grad(model.attention_rollout.sum(), hist[0], allow_unused=True)[0]
    assert g is not None

    fixed = build_model("dcal-vit-tiny").model.train()  # detach_history=True (default)
    fixed.compute_loss(fixed(x1, x2), y).backward()
    assert all(h.grad_fn is None for h in fixed.sa_attention_history)
    assert fixed.attention_rollout.grad_fn is None


def test_grad_checkpointing_same_grads():
    base = build_model("dcal-vit-tiny").model.train()
    ckpt = build_model("dcal-vit-tiny", grad_checkpointing=True).model.train()
    ckpt.load_state_dict(base.state_dict())
    x1, x2, y = _pair(base)
    for m in (base, ckpt):
        m.compute_loss(m(x1, x2), y).backward()
    for (n, p), (_, q) in zip(base.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_fused_rejects_attention_dropout():
    model = build_model("dcal-vit-tiny", attention_backend="fused", attn_drop=0.1).model.train()
    x1, x2, _ = _pair(model)
    with pytest.raises(ValueError, match="attn_drop"):
        model(x1, x2)


def test_dcal_vit_b16_parameter_count():
    model = build_model("dcal-vit-b16").model  # built once: 93.8 M random parameters
    n = sum(p.numel() for p in model.parameters())
    assert 90e6 < n < 105e6, n
    assert model.num_tokens == 785 and model.num_selected == 78
    assert model.cfg.depth == 12 and model.cfg.heads == 12 and model.cfg.dim == 768
    assert isinstance(model, DCAL)


_INTERP_SCRIPT = r"""
import json, torch
from memprof.models import build_model
from memprof.tritonkernels import _triton_attention as K
assert K.INTERPRETED
math_m = build_model("dcal-vit-tiny", attention_backend="math").model.train()
fused_m = build_model("dcal-vit-tiny", attention_backend="fused", kernel_backend="triton").model
fused_m.load_state_dict(math_m.state_dict()); fused_m.train()
g = torch.Generator().manual_seed(0)
x1, x2 = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
y = torch.tensor([1, 7])
res = []
for m in (math_m, fused_m):
    out = m(x1, x2); loss = m.compute_loss(out, y); loss.backward()
    res.append((out, {n: p.grad for n, p in m.named_parameters()}))
err = max(((res[1][0][k] - res[0][0][k]).norm() / res[0][0][k].norm()).item() for k in res[0][0])
gerr = max(((res[1][1][n] - g0).norm() / g0.norm().clamp_min(1e-12)).item()
           for n, g0 in res[0][1].items())
print(json.dumps({"out": err, "grad": gerr}))
"""


def test_fused_model_on_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert errs["out"] < 1e-4 and errs["grad"] < 1e-3, errs
