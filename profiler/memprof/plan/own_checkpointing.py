"""The model's own activation checkpointing, seen while an estimate runs its forward.

A model that checkpoints its blocks itself (Hugging Face's `gradient_checkpointing_enable()`,
`torch.utils.checkpoint` in a forward) was planned as "checkpointing none", and memprof's
policies wrapped its already checkpointed blocks a second time: 'every' gave the model's own
numbers under another name (or, around reentrant checkpoints, a second recompute), and
'selective' kept more than the model's own. Counting the checkpoints the forward opens,
memprof's own wrappers (memprof.plan.checkpoint) apart, lets the plan say what it estimated.
Both entry points of `torch.utils.checkpoint.checkpoint` are watched: the non-reentrant
generator and CheckpointFunction's forward (Hugging Face binds `checkpoint` itself when
checkpointing is enabled, so patching that name would miss it).
"""
from __future__ import annotations

import contextlib

import torch.utils.checkpoint as torch_checkpoint

from ..record.patches import PatchRegistry
from .checkpoint import _MARK, switch_names


def _memprofs(fn) -> bool:
    """Whether `fn` is what one of memprof's checkpoint wrappers runs (they mark it)."""
    return getattr(fn, _MARK, None) is not None


class OwnCheckpoints:
    """While open, counts the model's own checkpoint calls (`count`)."""

    def __init__(self):
        self.count = 0
        self._stack = contextlib.ExitStack()

    def _note(self, fn) -> None:
        if not _memprofs(fn):
            self.count += 1

    def __enter__(self) -> "OwnCheckpoints":
        registry = PatchRegistry()

        def generator(original):
            def counted(fn, *args, **kwargs):
                self._note(fn)
                return original(fn, *args, **kwargs)
            return counted

        def forward(original):
            def counted(ctx, run_function, *args):
                self._note(run_function)
                return original.__func__(ctx, run_function, *args)
            return staticmethod(counted)

        registry.patch(torch_checkpoint, "_checkpoint_without_reentrant_generator", generator)
        registry.patch(torch_checkpoint.CheckpointFunction, "forward", forward)
        self._stack.callback(registry.restore)
        return self

    def __exit__(self, *exc) -> bool:
        self._stack.close()
        return False


def text(policy: str, own: bool, policy_ran: bool = True) -> str:
    """The checkpointing an option runs: memprof's policy, the model's own, or both.
    `policy_ran` False: memprof's policy checkpointed no block (checkpoint.apply left them
    all to the model's own checkpointing), so the model's own is all that ran."""
    if not own:
        return policy
    return "model's own" if policy == "none" or not policy_ran else f"{policy} + model's own"


def policy_ran(policy: str, estimate) -> bool:
    """Whether memprof's `policy` checkpointed any block in `estimate` ('none': vacuously)."""
    return policy == "none" or estimate.policy_blocks > 0


def skip_reason(own_checkpoints: int, instead: bool = False) -> str:
    """Why memprof's policies are not estimated on top of the model's own checkpointing
    (`instead`: 'none' was not asked for, and the model is estimated as it runs)."""
    return (f"not estimated: the model checkpoints its blocks itself ({own_checkpoints} "
            f"checkpoints in its forward: {switch_names()[0]}() or "
            "torch.utils.checkpoint); this policy would checkpoint them a second time"
            + ("; estimated as the model runs instead (model's own)" if instead else ""))
