"""The fused attention as the custom op `tritonkernels::flash_attention` (tritonkernels/_op.py).

Under FakeTensorMode (memprof's estimates) a call is one dispatch whose outputs and saved tensors
are the Triton kernels' allocations, computed here by hand from the launchers in
_triton_attention.py. On CPU tensors without Triton's interpreter the op runs the chunked PyTorch
algorithm: its numerics, checkpointing (non-reentrant and selective) and torch.compile are
checked against `reference_attention`.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from memprof.tritonkernels import (BACKWARD_OP, FORWARD_OP, attention, kernel_scratch_bytes,
                                   reference_attention)

B, H, N, N2, D, R = 2, 3, 20, 11, 16, 5
VARIANTS = {"sa": {}, "pwca": {"kv2": True}, "glca": {"q_index": True},
            "sa-weights": {"weights": True}, "glca-pwca-weights": {"kv2": True, "q_index": True,
                                                                    "weights": True}}


class OpLog(TorchDispatchMode):
    """The ops that reach the dispatcher below autograd, less metadata queries (prim.device)
    and autograd's own detach views (no memory, no compute)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "prim" and func is not torch.ops.aten.detach.default:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _inputs(variant, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spec = VARIANTS[variant]
    q, k, v = (torch.randn(B, H, N, D, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    kv2 = tuple(torch.randn(B, H, N2, D, generator=gen).to(dtype).requires_grad_()
                for _ in range(2)) if spec.get("kv2") else None
    q_index = torch.stack([torch.randperm(N, generator=gen)[:R] for _ in range(B)]) \
        if spec.get("q_index") else None
    return q, k, v, kv2, q_index, spec.get("weights", False)


def _fake_inputs(mode, variant, dtype=torch.float32):
    """Fake copies in `mode` of `_inputs` (requires_grad kept)."""
    q, k, v, kv2, q_index, weights = _inputs(variant, dtype)

    def fake(t):
        return None if t is None else mode.from_tensor(t.detach()).requires_grad_(t.requires_grad)
    return (fake(q), fake(k), fake(v), None if kv2 is None else tuple(map(fake, kv2)),
            None if q_index is None else mode.from_tensor(q_index), weights)


# ---------------------------------------------------------------- fake: one dispatch, kernel bytes
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_call_is_one_op_with_the_kernels_allocations(variant, dtype):
    item = torch.tensor([], dtype=dtype).element_size()
    mode = FakeTensorMode()
    q, k, v, kv2, q_index, want = _fake_inputs(mode, variant, dtype)
    with mode:
        saved = []
        with OpLog() as fwd, torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t) or t, lambda t: t):
            res = attention(q, k, v, kv2=kv2, q_index=q_index,
                            need_weights="head_mean" if want else None)
        out, weights = res if want else (res, None)
        dout = torch.ones_like(out)
        leaves = [q, k, v] + (list(kv2) if kv2 else [])
        with OpLog() as bwd:
            grads = torch.autograd.grad(out, leaves, dout)
    assert fwd.ops == [FORWARD_OP.default]
    assert bwd.ops == [BACKWARD_OP.default]

    M = R if q_index is not None else N
    n_keys = N + (N2 if kv2 else 0)
    # _triton_attention.forward: out (B, M, H, D) memory seen as (B, H, M, D); lse float32
    assert out.shape == (B, H, M, D) and out.dtype == dtype
    assert out.stride() == (M * H * D, D, H * D, 1)
    assert out.untyped_storage().nbytes() == B * M * H * D * item
    if want:  # head_mean: (B, M, N1 + N2) in q's dtype
        assert weights.shape == (B, M, n_keys) and weights.dtype == dtype
        assert weights.untyped_storage().nbytes() == B * M * n_keys * item
    # saved: q, k, v, (k2, v2), out, lse (B, H, M) float32, q_index - nothing else
    nbytes = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in saved}
    expect = (3 * B * H * N * D + (2 * B * H * N2 * D if kv2 else 0) + B * H * M * D) * item \
        + B * H * M * 4 + (B * R * 8 if q_index is not None else 0)
    assert sum(nbytes.values()) == expect
    assert len(saved) == 5 + (2 if kv2 else 0) + (q_index is not None)
    # backward: dq like q, dk/dv (dk2/dv2) like their inputs; delta (B, H, M) fp32 is scratch
    for g, t in zip(grads, leaves):
        assert g.shape == t.shape and g.dtype == dtype
        assert g.untyped_storage().nbytes() == t.numel() * item
    args = (dout, q, k, v, None, None, out, None, None, 1.0)
    assert kernel_scratch_bytes(BACKWARD_OP.default, args) == B * H * M * 4
    assert kernel_scratch_bytes(FORWARD_OP.default, (q, k, v)) == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_fake_outputs_have_the_real_layouts(variant, monkeypatch):
    """The fake outputs' shapes, dtypes and strides are those of the real CPU outputs, for
    inputs that are permuted views as a fused projection gives them (compiled graphs rely on
    the fake layouts)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, kv2, q_index, want = _inputs(variant)
    q = q.detach().transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, H, D) memory
    k2, v2 = kv2 or (None, None)
    dout_shape = (B, H, R if q_index is not None else N, D)
    mode = FakeTensorMode()

    def calls(q, k, v, k2, v2, q_index, dout):
        res = FORWARD_OP(q, k, v, k2, v2, q_index, 0.25, want)
        return res + BACKWARD_OP(dout, q, k, v, k2, v2, res[0], res[1], q_index, 0.25)

    real_args = [t.detach() if t is not None else None for t in (q, k, v, k2, v2, q_index)]
    real = calls(*real_args, torch.randn(dout_shape))
    fake_args = [mode.from_tensor(t) if t is not None else None for t in real_args]
    with mode:
        fake = calls(*fake_args, torch.empty(dout_shape))
    assert [(t.shape, t.dtype, t.stride()) for t in fake] == \
        [(t.shape, t.dtype, t.stride()) for t in real]


def test_meta_tensors_take_the_op():
    q, k, v = (torch.empty(B, H, N, D, device="meta") for _ in range(3))
    with OpLog() as log:
        out, w = attention(q, k, v, need_weights="head_mean")
    assert log.ops == [FORWARD_OP.default]
    assert out.device.type == "meta" and out.shape == (B, H, N, D) and w.shape == (B, N, N)


def test_flop_counter_counts_the_op_like_sdpa():
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, \
        sdpa_flop_count
    mode = FakeTensorMode()
    q, k, v, kv2, _, _ = _fake_inputs(mode, "pwca")
    with mode:
        with FlopCounterMode(display=False) as counter:
            out = attention(q, k, v, kv2=kv2)
            out.backward(torch.ones_like(out))
    keys = (B, H, N + N2, D)
    expect = sdpa_flop_count((B, H, N, D), keys, keys) + \
        sdpa_backward_flop_count((B, H, N, D), (B, H, N, D), keys, keys)
    assert counter.get_total_flops() == expect


# ---------------------------------------------------------------- CPU numerics (chunked impl)
def _grads(out, leaves, seed=1):
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, leaves, dout), dout


def _reference_grads(q, k, v, kv2, q_index, dout):
    leaves = [t.detach().double().requires_grad_() for t in [q, k, v] + list(kv2 or ())]
    ref, probs = reference_attention(*leaves[:3], kv2=tuple(leaves[3:]) or None,
                                     q_index=q_index)
    return ref, probs, torch.autograd.grad(ref, leaves, dout.double())


@pytest.mark.parametrize("variant", VARIANTS)
def test_op_on_cpu_matches_reference(variant, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the chunked PyTorch implementation
    q, k, v, kv2, q_index, want = _inputs(variant)
    k2, v2 = kv2 or (None, None)
    res = FORWARD_OP(q, k, v, k2, v2, q_index, D ** -0.5, want)
    out, lse = res[0], res[1]
    leaves = [q, k, v] + list(kv2 or ())
    grads, dout = _grads(out, leaves)
    ref, probs, ref_grads = _reference_grads(q, k, v, kv2, q_index, dout)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-6)
    # lse in the kernels' convention: log2-sum-exp of the scaled scores
    qs, keys, _ = (t.double() for t in (q, k, v))
    if q_index is not None:
        qs = torch.gather(qs, 2, q_index[:, None, :, None].expand(B, H, R, D))
    if kv2:
        keys = torch.cat([keys, kv2[0].double()], dim=2)
    lse2 = torch.logsumexp(qs @ keys.transpose(-1, -2) * D ** -0.5, -1) / torch.log(
        torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(lse.double(), lse2, rtol=1e-6, atol=1e-6)
    if want:
        torch.testing.assert_close(res[2].double(), probs, rtol=1e-5, atol=1e-6)


def test_op_on_cpu_bfloat16_and_double_backward(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, kv2, q_index, _ = _inputs("glca-pwca-weights", torch.bfloat16)
    out = FORWARD_OP(q, k, v, *kv2, q_index, D ** -0.5, False)[0]
    leaves = [q, k, v, *kv2]
    grads, dout = _grads(out, leaves)
    ref, _, ref_grads = _reference_grads(q, k, v, kv2, q_index, dout)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), r, rtol=3e-2, atol=3e-2)
    # create_graph: the gradients are differentiable again (a gradient penalty)
    q, k, v, _, _, _ = _inputs("sa")
    out = FORWARD_OP(q, k, v, None, None, None, D ** -0.5, False)[0]
    (dq,) = torch.autograd.grad(out.square().sum(), [q], create_graph=True)
    (ddk,) = torch.autograd.grad(dq.square().sum(), [k])
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qd, kd, vd)[0]
    (rdq,) = torch.autograd.grad(ref.square().sum(), [qd], create_graph=True)
    (rddk,) = torch.autograd.grad(rdq.square().sum(), [kd])
    torch.testing.assert_close(ddk.double(), rddk, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- checkpointing, compile
def _block(x, x2, w):
    """A GLCA + PWCA attention block through the op, with projections around it."""
    q, k, v = ((x @ w[i]).unflatten(-1, (H, D)).transpose(1, 2) for i in range(3))
    k2, v2 = ((x2 @ w[i]).unflatten(-1, (H, D)).transpose(1, 2) for i in (1, 2))
    idx = torch.arange(R).expand(B, R)
    out = FORWARD_OP(q, k, v, k2, v2, idx, D ** -0.5, False)[0]
    return out.transpose(1, 2).flatten(2).tanh()


def _block_case(seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, H * D, generator=gen, requires_grad=True)
    x2 = torch.randn(B, N2, H * D, generator=gen, requires_grad=True)
    w = (torch.randn(3, H * D, H * D, generator=gen) / 8).requires_grad_()
    return x, x2, w


def _loss_and_grads(run, inputs):
    loss = run(*inputs).square().sum()
    return loss, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("policy", ["full", "save-attention", "recompute-attention"])
def test_checkpointed_recompute_matches(policy, monkeypatch):
    """Non-reentrant and selective checkpointing recompute the op cleanly: the same loss and
    gradients, bit for bit, and the op runs again in backward only when it is recomputed."""
    from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                        create_selective_checkpoint_contexts)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = _block_case()
    loss0, grads0 = _loss_and_grads(_block, inputs)
    kwargs = {}
    if policy != "full":
        keep = CheckpointPolicy.MUST_SAVE if policy == "save-attention" \
            else CheckpointPolicy.PREFER_RECOMPUTE

        def choose(ctx, op, *args, **kw):
            return keep if op is FORWARD_OP.default else CheckpointPolicy.PREFER_RECOMPUTE
        kwargs["context_fn"] = lambda: create_selective_checkpoint_contexts(choose)
    with OpLog() as log:
        loss1, grads1 = _loss_and_grads(
            lambda *a: checkpoint(_block, *a, use_reentrant=False, **kwargs), inputs)
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    runs = log.ops.count(FORWARD_OP.default)
    assert runs == (1 if policy == "save-attention" else 2)
    assert log.ops.count(BACKWARD_OP.default) == 1


def test_torch_compile_keeps_the_op_whole(monkeypatch):
    """torch.compile traces the op as one node (fullgraph: no graph break), and its backward as
    the backward op (not the differentiable math of double backward); results equal eager."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch._dynamo.reset()
    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = [n.target for n in gm.graph.nodes if n.op == "call_function"]
            return make_boxed_func(gm.forward)
        return compiler

    inputs = _block_case()
    loss0, grads0 = _loss_and_grads(_block, inputs)
    compiled = torch.compile(_block, fullgraph=True,
                             backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")))
    loss1, grads1 = _loss_and_grads(compiled, inputs)
    torch.testing.assert_close(loss1, loss0)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b)
    assert graphs["fw"].count(FORWARD_OP.default) == 1
    assert graphs["bw"].count(BACKWARD_OP.default) == 1
    assert FORWARD_OP.default not in graphs["bw"]
    assert torch.ops.aten._softmax.default not in graphs["bw"]


def test_public_attention_under_compile_matches_eager(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch._dynamo.reset()
    q, k, v, kv2, q_index, _ = _inputs("glca-pwca-weights")

    def fn(q, k, v, k2, v2):
        out, w = attention(q, k, v, kv2=(k2, v2), q_index=q_index, need_weights="head_mean")
        return out.sum() + w.sum()
    eager = fn(q, k, v, *kv2)
    compiled = torch.compile(fn, backend="aot_eager")(q, k, v, *kv2)
    torch.testing.assert_close(compiled, eager)


# ---------------------------------------------------------------- GPU: the model against the kernel
def _allocator_bytes(n: int) -> int:
    """A request as the CUDA caching allocator rounds it (512-byte blocks)."""
    return -(-n // 512) * 512


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_fake_model_matches_the_triton_kernels(variant):
    """On CUDA the op runs the Triton kernels: their outputs have the fake outputs' layouts,
    and the peak memory of each call is its outputs plus `kernel_scratch_bytes`."""
    q, k, v, kv2, q_index, want = (t if not isinstance(t, torch.Tensor) else t.detach().cuda()
                                   for t in _inputs(variant, torch.float16))
    k2, v2 = (kv2[0].detach().cuda(), kv2[1].detach().cuda()) if kv2 else (None, None)
    q_index = q_index.cuda() if q_index is not None else None
    dout = torch.randn(B, H, R if q_index is not None else N, D, device="cuda",
                       dtype=torch.float16)
    torch.cuda.synchronize()

    def peak_of(call):
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        res = call()
        torch.cuda.synchronize()
        return res, torch.cuda.max_memory_allocated() - base

    fwd, fwd_peak = peak_of(lambda: FORWARD_OP(q, k, v, k2, v2, q_index, 0.25, want))
    args = (dout, q, k, v, k2, v2, fwd[0], fwd[1], q_index, 0.25)
    bwd, bwd_peak = peak_of(lambda: BACKWARD_OP(*args))
    assert fwd_peak == sum(_allocator_bytes(t.untyped_storage().nbytes()) for t in fwd)
    assert bwd_peak == sum(_allocator_bytes(t.untyped_storage().nbytes()) for t in bwd) + \
        _allocator_bytes(kernel_scratch_bytes(BACKWARD_OP.default, args))
    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
    with mode:
        fake = FORWARD_OP(*fake_args[1:6], q_index=fake_args[8], scale=0.25,
                          want_weights=want) + BACKWARD_OP(*fake_args)
    assert [(t.shape, t.dtype, t.stride()) for t in fake] == \
        [(t.shape, t.dtype, t.stride()) for t in fwd + bwd]
