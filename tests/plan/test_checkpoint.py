"""memprof.checkpoint.apply: policies, block detection, undo, exact gradients, less memory."""
import copy

import pytest
import torch

import memprof
from memprof.plan.checkpoint import apply, find_blocks, parse_policy
from memprof.models import build_model


def _grads(model, batch, loss_fn):
    model.zero_grad(set_to_none=True)
    inputs, targets = batch
    loss = loss_fn(model(*inputs), targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("name", ["vit-tiny", "dcal-vit-tiny"])
@pytest.mark.parametrize("policy", ["every", "every-2", "selective"])
def test_gradients_equal_with_and_without_checkpointing(name, policy):
    torch.manual_seed(0)
    model, make_batch, loss_fn = build_model(name)
    torch.manual_seed(1)
    batch = make_batch(4)
    ref_loss, ref = _grads(model, batch, loss_fn)
    handle = apply(model, policy)
    assert handle.wrapped, "no block was checkpointed"
    loss, got = _grads(model, batch, loss_fn)
    handle.remove()
    assert torch.equal(loss, ref_loss)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7, msg=n)


def _peak_forward_backward(model, make_batch, loss_fn, b=16):
    torch.manual_seed(0)
    with memprof.track(model, analyses=[]) as prof:
        inputs, targets = make_batch(b)
        loss = loss_fn(model(*inputs), targets)
        loss.backward()
        del loss
    model.zero_grad(set_to_none=True)
    return prof.profile


def test_measured_activation_memory_drops():
    torch.manual_seed(0)
    model, make_batch, loss_fn = build_model("vit-tiny")
    base = _peak_forward_backward(model, make_batch, loss_fn)
    peaks = {"none": base.peak}
    acts = {"none": base.breakdown("category")["activations"]}
    for policy in ("every-2", "every", "selective"):
        with apply(model, policy):
            prof = _peak_forward_backward(model, make_batch, loss_fn)
        peaks[policy] = prof.peak
        acts[policy] = prof.breakdown("category")["activations"]
    assert peaks["every"] < peaks["every-2"] < peaks["none"]
    assert peaks["selective"] < peaks["none"]
    assert acts["every"] < 0.5 * acts["none"]


def test_find_blocks_and_overrides():
    vit = build_model("vit-tiny").model
    name, blocks = find_blocks(vit)
    assert name == "blocks" and len(blocks) == 4
    assert find_blocks(build_model("resnet-tiny").model)[0] == "stages"
    assert find_blocks(build_model("dcal-vit-tiny").model)[0] == "blocks"
    # by qualified name, by list, every-k picks blocks 0, k, 2k, ...
    h = apply(vit, "every", blocks="blocks")
    assert len(h.wrapped) == 4
    h.remove()
    h = apply(vit, "every-2")
    assert h.wrapped == [vit.blocks[0], vit.blocks[2]]
    h.remove()
    h = apply(vit, "every", blocks=[vit.blocks[1]])
    assert h.wrapped == [vit.blocks[1]]
    with pytest.raises(ValueError, match="already checkpointed"):
        apply(vit, "every", blocks=[vit.blocks[1]])
    h.remove()
    h.remove()  # idempotent
    assert all("forward" not in b.__dict__ for b in vit.blocks)


def test_remove_restores_model_and_no_grad_passthrough():
    torch.manual_seed(0)
    model, make_batch, _ = build_model("vit-tiny")
    before = copy.deepcopy(model.state_dict())
    (x,), _ = make_batch(2)
    with torch.no_grad():
        ref = model(x)
    h = apply(model, "selective")
    with torch.no_grad():  # no graph: blocks run as usual
        assert torch.equal(model(x), ref)
    h.remove()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert "none" == apply(model, "none").policy


def test_bad_input():
    vit = build_model("vit-tiny").model
    with pytest.raises(ValueError, match="unknown checkpointing policy"):
        apply(vit, "sometimes")
    with pytest.raises(ValueError, match="no submodule"):
        apply(vit, "every", blocks="encoder.layer")
    with pytest.raises(ValueError, match="no repeated blocks"):
        apply(torch.nn.Linear(4, 4), "every")
    with pytest.raises(TypeError):
        apply("not a model", "every")
    assert parse_policy("every-1") == ("every", 1)
    assert parse_policy("every-3") == ("every-k", 3)


def test_selective_saves_memory_on_long_sequences_of_math_attention():
    """At 785 tokens a math attention's N x N scores dominate a block's activations. Keeping the
    score matmul's output (beside the softmax backward recomputes from it) made "selective" cost
    more than no checkpointing; the policy keeps the linear layers' matmuls only."""
    from memprof.plan.estimate import measure_step
    model, make_batch, loss_fn = build_model("dcal-vit-tiny", img_size=224, patch_size=8)
    peaks = {policy: measure_step(model, make_batch, loss_fn, 1, checkpointing=policy)[0].peak
             for policy in ("none", "selective", "every")}
    assert peaks["every"] < peaks["selective"] < 0.9 * peaks["none"]
