"""Recomputes of torch.utils.checkpoint run under the estimate's function modes.

Backward runs with torch function modes popped, so a block the model checkpoints itself
(Hugging Face's `gradient_checkpointing_enable()`, `torch.utils.checkpoint` in a forward)
was recomputed on the CPU kernels, without the CUDA kernel and autocast rules: non-reentrant
checkpointing then raised CheckpointError (a different number of tensors saved) and a
reentrant one recorded the CPU kernels' memory. memprof's own policies wrap the blocks they
checkpoint (`cuda_autocast.run_under`); this reaches every other checkpoint of the step.
"""
from __future__ import annotations

import contextlib

import torch.utils.checkpoint as torch_checkpoint
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from ..record.patches import PatchRegistry


def _enter_missing(stack: contextlib.ExitStack, modes) -> None:
    """Enter, outermost first, the modes that are not active (a recompute inside one of
    memprof's own wrapped blocks already runs under them)."""
    active = _get_current_function_mode_stack()
    for mode in modes:
        if not any(m is mode for m in active):
            stack.enter_context(mode)


@contextlib.contextmanager
def recompute_under(*modes):
    """While open, every checkpoint recompute (reentrant or not) runs under those of `modes`
    that are function modes (a nullcontext stands for none), in that order, outermost first."""
    modes = [m for m in modes if isinstance(m, TorchFunctionMode)]
    if not modes:
        yield
        return
    registry = PatchRegistry()

    def hook_class(original):
        class RecomputationUnderModes(original):   # non-reentrant: the unpack hook's recompute
            def __enter__(self):
                self._modes = contextlib.ExitStack()
                _enter_missing(self._modes, modes)
                return super().__enter__()

            def __exit__(self, *exc):
                try:
                    return super().__exit__(*exc)
                finally:
                    self._modes.close()
        return RecomputationUnderModes

    def backward(original):                         # reentrant: CheckpointFunction.backward
        def under_modes(ctx, *args):
            with contextlib.ExitStack() as stack:
                _enter_missing(stack, modes)
                return original.__func__(ctx, *args)
        return staticmethod(under_modes)

    registry.patch(torch_checkpoint, "_recomputation_hook", hook_class)
    registry.patch(torch_checkpoint.CheckpointFunction, "backward", backward)
    try:
        yield
    finally:
        registry.restore()
