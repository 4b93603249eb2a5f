"""The plan's rules for memprof's fused attention op: the selective policy keeps its outputs
(as it keeps SDPA's), and the backward's delta buffer is kernel scratch."""
from __future__ import annotations

import torch

from memprof.models import build_model
from memprof.plan.checkpoint import _selective_policy
from memprof.plan.cuda_kernels import KernelScratch, target_for
from memprof.plan.estimate import Estimator
from memprof.plan.gpus import lookup
from memprof.tritonkernels import BACKWARD_OP, FORWARD_OP
from torch.utils.checkpoint import CheckpointPolicy


def test_selective_policy_keeps_the_fused_forward_and_recomputes_nothing_it_counts():
    assert _selective_policy(None, FORWARD_OP.default) == CheckpointPolicy.MUST_SAVE
    assert _selective_policy(None, BACKWARD_OP.default) == CheckpointPolicy.PREFER_RECOMPUTE
    model, make_batch, loss_fn = build_model("vit-tiny", attention_backend="fused")
    est = Estimator(model, make_batch, loss_fn, gpu="a100-80gb")
    none = est.step(2, checkpointing="none")
    selective = est.step(2, checkpointing="selective")
    every = est.step(2, checkpointing="every")
    # selective recomputes only what FLOP counting ignores (elementwise ops): the attention
    # and the matmuls are kept, so no FLOP is spent twice; "every" recomputes them
    assert selective.flops == none.flops < every.flops


def test_fused_backward_scratch_is_its_delta_buffer():
    scratch = KernelScratch(target_for(lookup("a100-80gb")))
    B, H, M, N, D = 2, 3, 17, 17, 8
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, k, v = (torch.empty(B, M, H, D) for _ in range(3))
        out = torch.empty(B, M, H, D)
        lse = torch.empty(B, H, M)
        args = (out, q, k, v, None, None, out, lse, None, 0.35)
        assert scratch.scratch(BACKWARD_OP.default, args) == B * H * M * 4
        assert scratch.scratch(FORWARD_OP.default, (q, k, v, None, None, None, 0.35, False)) == 0
