"""A model that checkpoints its own blocks (Hugging Face's gradient_checkpointing_enable(),
torch.utils.checkpoint in its forward) is estimated with the target GPU's kernels in the
recompute too: backward runs with function modes popped, so the recompute ran the CPU
kernels - non-reentrant checkpointing then raised CheckpointError (a different number of
tensors saved) and `memprof recommend` planned nothing for a LoRA model so set up."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from memprof.plan.estimate import estimate_step


class Block(nn.Module):
    def __init__(self, d=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.out(a.transpose(1, 2).reshape(b, n, d))


class Net(nn.Module):
    """`own`: None (no checkpointing), "reentrant" or "non-reentrant" (its own)."""

    def __init__(self, own=None, blocks=3, d=64):
        super().__init__()
        self.own = own
        self.embed = nn.Linear(d, d)   # the blocks' input requires grad (reentrant needs it)
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        x = self.embed(x)
        for blk in self.blocks:
            if self.own is None:
                x = blk(x)
            else:
                x = checkpoint(blk, x, use_reentrant=self.own == "reentrant")
        return self.head(x.mean(1))


def _batch(b):
    return (torch.randn(b, 128, 64),), torch.randint(0, 10, (b,))


def _estimate(model, checkpointing="none", precision="fp32"):
    torch.manual_seed(0)
    return estimate_step(model, _batch, batch_size=4, gpu="a100-40gb", precision=precision,
                         checkpointing=checkpointing)


@pytest.mark.parametrize("own", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_own_checkpointing_recomputes_with_the_gpu_kernels(own, precision):
    torch.manual_seed(0)
    ours = _estimate(Net(), "every", precision)    # memprof's own policy: the reference
    torch.manual_seed(0)
    theirs = _estimate(Net(own), precision=precision)
    # every SDPA call, forward and recompute, went through the CUDA kernel rules
    assert theirs.kernel_rules == ours.kernel_rules
    assert sum(theirs.kernel_rules.values()) == 2 * 3
    assert theirs.peak_allocated == pytest.approx(ours.peak_allocated, rel=0.02)
    assert theirs.steady_peak_allocated == pytest.approx(ours.steady_peak_allocated, rel=0.02)
