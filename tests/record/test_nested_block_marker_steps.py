"""A block nested in another numbers its steps from its own start (nested_steps.py), but its
backward() calls and its step markers kept the outer's numbering: the inner profile of a loop
that retains no graph reported `retain_graph ... (steps [0, 1, 2])`, the outer loop's calls
before the block; and its last forward read as outer step 5 of an inner run of 4, so the loss
of its last training step, still held, read as a retained graph where a block of its own
reports nothing. The block's calls and markers are now its own, from 0."""
import warnings

import pytest
import torch

import memprof

pytestmark = pytest.mark.usefixtures("collect_garbage_after")


def _step(model, opt, retain=False):
    loss = model(torch.randn(4, 8)).pow(2).sum()
    loss.backward(retain_graph=retain)
    opt.step()
    opt.zero_grad()
    return loss


def _kinds(prof, kinds):
    return [f.kind for f in prof.findings if f.kind in kinds]


def test_the_outer_blocks_backward_calls_are_not_the_nested_blocks():
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with memprof.track() as outer:
            for _ in range(3):
                _step(model, opt, retain=True)
            with memprof.track(model, opt) as inner:
                for _ in range(3):
                    _step(model, opt)
    assert [c["step"] for c in inner.run.records["backward"]] == [0, 1, 2]
    assert not any(c["retain_graph"] for c in inner.run.records["backward"])
    assert _kinds(inner, ("retain_graph", "backward_twice")) == []
    assert [c["step"] for c in outer.run.records["backward"]] == list(range(6))


def _block(model, opt):
    for _ in range(3):
        loss = _step(model, opt)
    opt.step()   # leftover micro-batches: a step boundary without a forward pass
    return loss


def test_the_last_training_steps_loss_in_a_nested_block_is_no_retained_graph():
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with memprof.track(model, opt) as alone:
            loss = _block(model, opt)
        with memprof.track(model, opt):
            for _ in range(3):
                _step(model, opt)
            with memprof.track(model, opt) as inner:
                loss = _block(model, opt)
    assert loss is not None
    assert _kinds(alone, ("retained_graph",)) == []
    assert _kinds(inner, ("retained_graph",)) == []
    assert [m["value"] for m in inner.markers("forward_start")] == [0, 1, 2]
    assert [m["value"] for m in inner.markers("step")] == [0, 1, 2, 3]
