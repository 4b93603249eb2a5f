"""memprof.estimate: a fake-tensor step predicts the peak that memprof.track measures.

The validation compares like with like: the estimate of one training step (forward, loss,
backward, AdamW step creating its state, zero_grad) against the FIRST step of a real CPU run of
the same model, batch and optimizer, measured by memprof.track (batch created inside the block
in both). The estimate also counts module buffers, which a real run's tracker does not see (they
exist before it starts), so those bytes are added to the measured peak.
"""
import copy

import numpy as np
import pytest
import torch
from tiny_mlp import LoRALinear

from memprof.plan.batch_model import BatchModel
from memprof.plan.estimate import Estimator, estimate_step, measure_step
from memprof.models import build_model
from memprof.record.events import CAT_GRADIENTS

CASES = {  # model: two batch sizes (small: the real CPU step must be quick)
    "mlp": (8, 32),
    "resnet-tiny": (16, 32),
    "vit-tiny": (4, 16),
    "dcal-vit-tiny": (4, 16),
}


def measured_peak(model, make_batch, loss_fn, batch_size, policy):
    return measure_step(model, make_batch, loss_fn, batch_size, checkpointing=policy)[0]


def _fwd_bwd_peak(profile) -> int:
    ph = profile.memory["phase"]
    mask = (ph == 1) | (ph == 2)
    return int(profile.live_bytes()[mask].max())


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_matches_measured_peak(name):
    torch.manual_seed(0)
    model, make_batch, loss_fn = build_model(name)
    est = Estimator(model, make_batch, loss_fn, optimizer="adamw")
    for policy in ("none", "every"):
        for b in CASES[name]:
            e = est.step(b, checkpointing=policy)
            real = measured_peak(model, make_batch, loss_fn, b, policy)
            want = real.peak + e.buffers_bytes
            err = e.peak_allocated / want - 1
            assert abs(err) < 0.03, (f"{name} batch {b} checkpointing {policy}: estimated "
                                     f"{e.peak_allocated} vs measured {want} ({err:+.2%})")
            # the activation peak too (the step's peak is often the optimizer's)
            fb_err = _fwd_bwd_peak(e.profile) / (_fwd_bwd_peak(real) + e.buffers_bytes) - 1
            assert abs(fb_err) < 0.03, f"{name} {b} {policy}: fwd+bwd peak {fb_err:+.2%}"


def test_estimate_is_a_profile_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model, make_batch, loss_fn = build_model("dcal-vit-tiny")
    state = copy.deepcopy(model.state_dict())
    params = [id(p) for p in model.parameters()]
    e = estimate_step(model, make_batch, loss_fn, batch_size=4, checkpointing="every")
    # the user's model is untouched: same tensors, same values, no grads, no wrappers
    assert [id(p) for p in model.parameters()] == params
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())
    for k, v in model.state_dict().items():
        assert type(v) is torch.Tensor and torch.equal(v, state[k])
    p = e.profile
    assert p.device == "cuda" and p.meta["estimated"] is True
    assert p.meta["batch_size"] == 4 and p.meta["checkpointing"] == "every"
    assert p.peak == e.peak_allocated > 0
    cats = p.breakdown("category", at="end")
    assert cats["optimizer_state"] > 2 * 4 * sum(q.numel() for q in model.parameters()) - 1
    assert cats["parameters"] == e.params_bytes
    assert e.peak_reserved >= e.peak_allocated
    assert e.steady_peak_allocated >= e.peak_allocated
    assert e.accumulating_peak_allocated >= e.steady_peak_allocated
    assert p.summary()["device"] == "cuda"
    # the model still trains for real afterwards
    inputs, targets = make_batch(2)
    loss_fn(model(*inputs), targets).backward()


def test_frozen_parameters_get_no_gradients_or_state():
    torch.manual_seed(0)
    d = 256
    model = torch.nn.Sequential(LoRALinear(d), torch.nn.ReLU(), LoRALinear(d),
                                torch.nn.Linear(d, 10))

    def make_batch(b):
        return (torch.randn(b, d),), torch.randint(0, 10, (b,))

    def loss_fn(out, y):
        return torch.nn.functional.cross_entropy(out, y)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    e = estimate_step(model, make_batch, loss_fn, batch_size=8)
    assert e.trainable_params == trainable
    mem = e.profile
    grads = [i for i in range(mem.memory.size)
             if mem.category[i] == CAT_GRADIENTS and mem.memory["size"][i] > 0]
    assert sum(int(mem.memory["size"][i]) for i in grads) == 4 * trainable
    state = mem.breakdown("category", at="end")["optimizer_state"]
    n_trainable_tensors = sum(1 for p in model.parameters() if p.requires_grad)
    assert state == 2 * 4 * trainable + 4 * n_trainable_tensors  # exp_avg, exp_avg_sq, step
    real = measured_peak(model, make_batch, loss_fn, 8, "none")
    assert abs(e.peak_allocated / real.peak - 1) < 0.03


class Attn(torch.nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.q = torch.nn.Linear(d, d)
        self.out = torch.nn.Linear(d, 10)

    def forward(self, x):  # x (B, N, d)
        h = self.norm(x)
        q = self.q(h)
        a = (q @ h.transpose(1, 2)).softmax(-1)       # (B, N, N)
        return self.out((a @ h).mean(1))


def _allocs(profile, op_substr):
    mem = profile.memory
    return sorted(int(mem["size"][i]) for i in range(mem.size) if mem["size"][i] > 0
                  and mem["op"][i] >= 0 and op_substr in profile.strings[mem["op"][i]]
                  and mem["phase"][i] == 1)


def test_mixed_precision_follows_the_cuda_autocast_policy():
    torch.manual_seed(0)
    B, N, d = 4, 32, 64
    model = Attn(d)

    def make_batch(b):
        return (torch.randn(b, N, d),), torch.randint(0, 10, (b,))

    def loss_fn(out, y):
        return torch.nn.functional.cross_entropy(out, y)
    e32 = estimate_step(model, make_batch, loss_fn, batch_size=B)
    e16 = estimate_step(model, make_batch, loss_fn, batch_size=B, precision="fp16")
    ebf = estimate_step(model, make_batch, loss_fn, batch_size=B, precision="bf16")
    # softmax: fp32 output from fp16 input (CUDA's fused half-to-float softmax), no input copy
    assert B * N * N * 4 in _allocs(e16.profile, "softmax")
    assert B * N * N * 2 not in _allocs(e16.profile, "softmax")
    # the scores matmul runs in fp16
    assert B * N * N * 2 in _allocs(e16.profile, "matmul")
    # layer_norm runs in fp32 (CUDA autocast's fp32 list): its output is fp32
    assert B * N * d * 4 in _allocs(e16.profile, "layer_norm")
    # the linear layers run in fp16
    assert B * N * d * 2 in _allocs(e16.profile, "linear")
    # bf16: CUDA casts the input to fp32 first (a copy), then softmax in fp32
    assert B * N * N * 4 in _allocs(ebf.profile, "softmax")
    assert e32.profile.meta["precision"] == "fp32" and e16.profile.meta["precision"] == "fp16"
    # fp32 master weights: parameters, gradients and optimizer state are the same bytes
    for e in (e16, ebf):
        assert e.params_bytes == e32.params_bytes
        assert (e.profile.breakdown("category", at="end")["optimizer_state"]
                == e32.profile.breakdown("category", at="end")["optimizer_state"])


@pytest.mark.parametrize("precision, policy", [("fp16", "every"), ("bf16", "selective"),
                                               ("fp16", "every-2")])
def test_mixed_precision_with_checkpointing(precision, policy):
    model, make_batch, loss_fn = build_model("dcal-vit-tiny")
    est = Estimator(model, make_batch, loss_fn)
    ck = est.step(64, precision=precision, checkpointing=policy)
    plain = est.step(64, precision=precision)
    assert ck.peak_allocated < plain.peak_allocated
    if policy == "selective":
        # the linear layers' matmuls are kept; only the attention's small batched matmuls
        # (17 tokens) are recomputed, far fewer FLOPs than recomputing whole blocks
        every = est.step(64, precision=precision, checkpointing="every")
        assert plain.flops < ck.flops < plain.flops + 0.25 * (every.flops - plain.flops)
    else:
        assert ck.flops > plain.flops  # recompute is counted


def test_flops_are_counted_exactly_for_an_mlp():
    model, make_batch, loss_fn = build_model("mlp")
    B = 16
    e = estimate_step(model, make_batch, loss_fn, batch_size=B)
    layers = [(784, 1024), (1024, 1024), (1024, 10)]
    fwd = sum(2 * B * i * o for i, o in layers)
    bwd = fwd + sum(2 * B * i * o for i, o in layers[1:])  # no input gradient for layer 1
    assert e.flops_by_phase["forward"] == fwd
    assert e.flops_by_phase["backward"] == bwd
    assert e.flops == fwd + bwd


@pytest.mark.parametrize("backend", ["math", "fused"])
def test_batch_model_interpolates_exactly(backend):
    """fused: PWCA's chunked loop must run the same ops at every batch size."""
    model, make_batch, loss_fn = build_model("dcal-vit-tiny", attention_backend=backend)
    est = Estimator(model, make_batch, loss_fn)
    bm = BatchModel(est.step(2, precision="fp16"), est.step(4, precision="fp16"))
    assert bm.exact
    actual = est.step(9, precision="fp16")
    for acc, variant in ((1, "steady"), (3, "accumulate")):
        p = bm.predict(9, acc)
        assert p.peak_allocated == actual.peak(variant)
        assert p.peak_reserved == actual.peak(variant, reserved=True)
    assert bm.predict(9).flops == actual.flops
    budget = actual.steady_peak_reserved
    assert bm.max_batch(budget, accumulation=1) >= 9
    assert bm.predict(bm.max_batch(budget) + 1).peak_reserved > budget


def test_bad_input():
    model, make_batch, loss_fn = build_model("mlp")
    with pytest.raises(ValueError, match="precision"):
        estimate_step(model, make_batch, loss_fn, batch_size=2, precision="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        estimate_step(model, make_batch, loss_fn, batch_size=0)
    with pytest.raises(ValueError, match="optimizer"):
        estimate_step(model, make_batch, loss_fn, batch_size=2, optimizer="adamx")
    with pytest.raises(TypeError, match="scalar"):
        estimate_step(model, make_batch, lambda out, y: out, batch_size=2)
    assert np.all([p.grad is None for p in model.parameters()])


def test_estimate_runs_fused_attention_and_matches_measured():
    """The fused DCAL (GLCA's q_index, PWCA's kv2) runs under fake tensors - q_index values can
    not be read there - and its estimate matches the measured step; both estimates see what the
    fused kernels save: less than math attention."""
    torch.manual_seed(0)
    peaks = {}
    for backend in ("math", "fused"):
        model, make_batch, loss_fn = build_model("dcal-vit-tiny", img_size=64,
                                                 attention_backend=backend)
        e = Estimator(model, make_batch, loss_fn, optimizer="adamw").step(4)
        real = measured_peak(model, make_batch, loss_fn, 4, "none")
        err = e.peak_allocated / (real.peak + e.buffers_bytes) - 1
        assert abs(err) < 0.03, f"{backend}: estimated vs measured {err:+.2%}"
        peaks[backend] = _fwd_bwd_peak(e.profile)
    assert peaks["fused"] < 0.9 * peaks["math"], peaks
