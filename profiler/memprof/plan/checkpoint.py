"""Apply an activation-checkpointing policy to a model: `memprof.checkpoint.apply`.

    handle = memprof.checkpoint.apply(model, "every")      # or "every-2", "selective", "none"
    ...train...
    handle.remove()                                          # undo (or: with apply(...): ...)

Policies (non-reentrant `torch.utils.checkpoint.checkpoint` around each selected block):

    none        nothing is checkpointed (a handle is still returned)
    every       every block: only the block's inputs are kept; the block is recomputed in backward
    every-k     every k-th block (blocks 0, k, 2k, ...): about 1/k of the blocks checkpointed,
                less recompute than "every", less memory saved
    selective   every block, but the outputs of the linear layers' matmuls (mm, addmm) and of
                fused attention kernels (SDPA's, memprof's) are saved; the rest (norms,
                activations, softmax, casts, elementwise, and a math attention's batched
                matmuls) is recomputed
                (`torch.utils.checkpoint.create_selective_checkpoint_contexts`). A math
                attention's score matmul (bmm / baddbmm) is recomputed rather than kept: its
                output is the N x N scores, and keeping them beside the softmax that backward
                recomputes from them cost more than no checkpointing at 785 tokens (measured:
                181 against 169 MB on a DCAL step at 448 px)

Blocks are found automatically: the nn.ModuleList / nn.Sequential with the most children that
all have the same type (ties: more parameters), e.g. `model.blocks` of a ViT; if no container
is homogeneous, the largest group of same-type children of one container. An
encoder-decoder's other stack (T5's encoder.block and decoder.block) comes with it: every
homogeneous stack with at least a quarter of the largest one's parameters, not inside another.
Override with `blocks=` (a list of modules, or qualified names of containers such as
"encoder.layer", several separated by commas).

Blocks that checkpoint themselves (Hugging Face's own activation checkpointing is on) are
left to it, with one warning: see `apply`.

Checkpointing wraps the block's `forward` (an instance attribute, removed again by
`handle.remove()`): module hooks, parameters and state dicts are unchanged. Under
`torch.no_grad()` the block runs as usual; with gradients, a checkpointed block runs without a
KV cache (`use_cache=False`, the cache arguments None, by name or by position), as Hugging
Face's own checkpointed layers do: a block that writes the cache in the forward and again in
the recompute cannot be recomputed. This is the same function `memprof.plan.estimate` uses to
estimate a checkpointed step, so an estimate and the run it predicts share the code.
"""
from __future__ import annotations

import functools
import inspect
import re
import sys
import warnings
from typing import Iterable, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from .errors import PlanInputError, comma_list

__all__ = ["apply", "CheckpointHandle", "checkpoints_itself", "find_blocks", "resolve_blocks", "policies_for",
           "POLICIES", "parse_policy", "SAVED_OPS"]

POLICIES = ("none", "every", "every-k", "selective")
#: what blocks= (--blocks) holds, as an error says it
BLOCK_NAMES = "qualified module names such as encoder.layer"

_aten = torch.ops.aten
#: ops whose outputs the "selective" policy keeps (everything else is recomputed)
SAVED_OPS = frozenset(op for op in (
    getattr(_aten, name, None) for name in (
        "mm", "addmm", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable",
        "_flash_attention_forward", "_efficient_attention_forward"))
    if op is not None)

#: memprof's fused attention (memprof.tritonkernels), kept like SDPA's kernels (its out and
#: log-sum-exp); named rather than imported: importing it loads Triton
SAVED_OP_NAMES = frozenset({"tritonkernels::flash_attention"})

_MARK = "_memprof_checkpoint"


def parse_policy(policy: str, name: str = "policy") -> tuple[str, int]:
    """'none' | 'every' | 'every-k' | 'selective' -> (kind, k). `name`: what a bad one is
    said as, the parameter or option the user gave it in (recommend's 'policies',
    '--checkpointing')."""
    if not isinstance(policy, str):
        raise TypeError(f"{name}: expected a string such as 'every' or 'every-2', got "
                        f"{type(policy).__name__}")
    p = policy.strip().lower()
    if p in ("none", "off", "false"):
        return "none", 0
    if p in ("every", "full", "all", "every-1"):
        return "every", 1
    if p == "selective":
        return "selective", 1
    m = re.fullmatch(r"every-(\d+)", p)
    if m and int(m.group(1)) >= 1:
        k = int(m.group(1))
        return ("every", 1) if k == 1 else ("every-k", k)
    raise ValueError(f"{name}: unknown checkpointing policy {policy!r}; expected none, every, "
                     "every-k such as every-2, or selective")


def _selective_policy(ctx, op, *args, **kwargs):
    packet = getattr(op, "overloadpacket", op)
    if packet in SAVED_OPS or op in SAVED_OPS or (
            getattr(op, "namespace", None) == "tritonkernels" and op.name() in SAVED_OP_NAMES):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


#: another stack of blocks is checkpointed with the largest one when it holds at least this
#: share of its parameters (an encoder-decoder's two stacks; not a list of two small heads)
OTHER_STACK_SHARE = 0.25


def _nested(a: str, b: str) -> bool:
    """Whether one qualified module name is the other or inside it ('' is the model)."""
    return a == b or not a or not b or a.startswith(b + ".") or b.startswith(a + ".")


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """(container name, its repeated blocks) chosen automatically; see the module docstring.
    An encoder-decoder (T5, BART) has a stack each: every stack of same-type blocks holding
    at least OTHER_STACK_SHARE of the largest one's parameters, not inside another, is taken
    with it (names joined by commas, in the model's order): checkpointing only the largest
    left T5's encoder, most of its activations, out. Raises ValueError when the model has no
    repeated blocks."""
    found = []  # (key, order, name, blocks); key = (homogeneous, count, params)
    for order, (name, mod) in enumerate(model.named_modules()):
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(mod.children())
        if len(children) < 2:
            continue
        groups: dict[type, list[nn.Module]] = {}
        for c in children:
            groups.setdefault(type(c), []).append(c)
        homogeneous = len(groups) == 1
        for typ, members in groups.items():
            if len(members) < 2 or _n_params(members[0]) == 0:
                continue
            found.append(((homogeneous, len(members), sum(_n_params(m) for m in members)),
                          order, name, members))
    if not found:
        raise ValueError(f"blocks: found no repeated blocks (an nn.ModuleList / nn.Sequential "
                         f"of same-type modules) in {type(model).__name__}; pass blocks= "
                         "(a list of modules or a qualified name)")
    best = max(found, key=lambda f: f[0])
    chosen = [best]
    for key, order, name, members in sorted(found, key=lambda f: f[0], reverse=True):
        if key[0] and best[0][0] and key[2] >= OTHER_STACK_SHARE * best[0][2] and \
                not any(_nested(name, c[2]) for c in chosen):
            chosen.append((key, order, name, members))
    chosen.sort(key=lambda f: f[1])
    return ",".join(c[2] for c in chosen), [m for c in chosen for m in c[3]]


def resolve_blocks(model: nn.Module, blocks) -> tuple[str, list[nn.Module]]:
    """blocks= (None: found automatically, a qualified name - or several, comma-separated:
    'encoder.block,decoder.block' -, or modules) -> (container name, the blocks)."""
    if blocks is None:
        return find_blocks(model)
    if isinstance(blocks, str):
        mods: list[nn.Module] = []
        names = comma_list(blocks, "blocks", BLOCK_NAMES)
        if not names:   # get_submodule('') is the model: its children were checkpointed
            raise PlanInputError(f"blocks {blocks!r}: expected {BLOCK_NAMES}; leave it None "
                                 "for the blocks found automatically", "blocks")
        for name in names:
            try:
                container = model.get_submodule(name)
            except AttributeError:
                raise PlanInputError(f"blocks: {type(model).__name__} has no submodule "
                                     f"{name!r}", "blocks") from None
            mods += list(container.children()) or [container]
        return blocks, mods
    if isinstance(blocks, nn.Module):
        blocks = [blocks]
    try:
        mods = list(blocks)
    except TypeError:
        raise TypeError(f"blocks: expected a list of modules or a qualified name, got "
                        f"{type(blocks).__name__}") from None
    for m in mods:
        if not isinstance(m, nn.Module):
            raise TypeError(f"blocks: expected nn.Module entries, got {type(m).__name__}")
    return "<given>", mods


class CheckpointHandle:
    """What `apply` did; `.remove()` undoes it (idempotent). Also a context manager."""

    def __init__(self, model: nn.Module, policy: str, container: str,
                 blocks: list[nn.Module], wrapped: list[nn.Module]):
        self.model = model
        self.policy = policy
        self.container = container
        self.blocks = blocks          # all candidate blocks
        self.wrapped = wrapped        # the blocks actually checkpointed
        self.skipped: list[nn.Module] = []   # left to the model's own checkpointing
        self.active = True
        self._said_own = False

    def say_own(self, blocks: int, of: int, later: bool = False) -> None:
        """Warn, once per handle, that blocks checkpoint themselves and are left to it."""
        if self._said_own:
            return
        self._said_own = True
        on, off = switch_names(self.model)
        when = "now checkpoint themselves" if later else "checkpoint themselves"
        warnings.warn(
            f"memprof.checkpoint.apply: {blocks} of {of} blocks of "
            f"{type(self.model).__name__} {when} (Hugging Face's {on}()): left to "
            f"the model's own checkpointing, not checkpointed a second time; for policy "
            f"{self.policy!r} instead, call model.{off}() first", UserWarning, stacklevel=3)

    def remove(self) -> None:
        for m in self.wrapped:
            fwd = m.__dict__.get("forward")
            if fwd is not None and getattr(fwd, _MARK, None) is self:
                del m.__dict__["forward"]
        self.wrapped = []
        self.active = False

    def __enter__(self) -> "CheckpointHandle":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def __repr__(self) -> str:
        return (f"CheckpointHandle(policy={self.policy!r}, container={self.container!r}, "
                f"checkpointed={len(self.wrapped)}/{len(self.blocks)} blocks, "
                f"active={self.active})")


#: keyword arguments through which a transformer block reads and writes a KV cache
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")
#: of those, the name other blocks also give a tensor they only read (a rotary table): there a
#: KV cache is a cache object or a tuple of tensors, and a tensor is passed on
_GENERIC_CACHE = "cache"


def _is_cache(name: str, value) -> bool:
    return value is not None and not (name == _GENERIC_CACHE and isinstance(value, torch.Tensor))


def _cache_positions(inner) -> dict[int, str]:
    """Positions of the cache parameters in a block's forward, with their names (Hugging
    Face's GPT-2 block takes its cache as the second positional argument)."""
    try:
        params = list(inspect.signature(inner).parameters.values())
    except (TypeError, ValueError):      # a C function or a callable without a signature
        return {}
    return {i: p.name for i, p in enumerate(params)
            if p.name in _CACHE_KWARGS
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _without_cache(block: nn.Module, positions: dict[int, str], args: tuple,
                   kwargs: dict) -> tuple[tuple, dict]:
    """A block given a KV cache (Hugging Face decoders in training keep use_cache=True unless
    their own gradient checkpointing is on) writes to it in the forward and again in the
    recompute, so the two run different ops (torch.utils.checkpoint raises: "a different
    number of tensors was saved", or under the selective policy "aten.slice.Tensor encountered
    during backward but not found in storage"). As Hugging Face's checkpointed layers do, a
    checkpointed block runs without the cache, passed by name or by position (a block class
    that only reads it says so with `_can_checkpoint_with_cache`)."""
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    if not getattr(block, "_can_checkpoint_with_cache", False):
        for name in _CACHE_KWARGS:
            if _is_cache(name, kwargs.get(name)):
                kwargs[name] = None
        if any(i < len(args) and _is_cache(name, args[i]) for i, name in positions.items()):
            args = tuple(None if i in positions and _is_cache(positions[i], a) else a
                         for i, a in enumerate(args))
    return args, kwargs


#: the flag through which Hugging Face models switch their own checkpointing: on each block
#: (transformers 5's GradientCheckpointingLayer) or, in older versions, on the stack whose
#: loop checkpoints its blocks
_OWN_FLAG = "gradient_checkpointing"


def switch_names(model=None) -> tuple[str, str]:
    """The methods that turn a Hugging Face model's own checkpointing on and off, as the
    installed transformers names them: transformers 5.x deprecates
    gradient_checkpointing_enable/_disable (a FutureWarning) for
    activation_checkpointing_enable/_disable. Read from `model`, else from transformers when
    it is already imported; the older names where neither has the new ones."""
    holder = model if model is not None and hasattr(model, "gradient_checkpointing_enable") \
        else getattr(sys.modules.get("transformers"), "PreTrainedModel", None)
    if holder is not None and hasattr(holder, "activation_checkpointing_enable"):
        return "activation_checkpointing_enable", "activation_checkpointing_disable"
    return "gradient_checkpointing_enable", "gradient_checkpointing_disable"


def _own_switch(model: nn.Module, name: str | None) -> nn.Module | None:
    """The module whose flag says whether the block named `name` checkpoints itself: the
    block, else its nearest ancestor that has one; None when none has (or no name)."""
    if name is None:
        return None
    parts = name.split(".") if name else []
    for i in range(len(parts), -1, -1):
        m = model.get_submodule(".".join(parts[:i]))
        if hasattr(m, _OWN_FLAG):
            return m
    return None


def _checkpoints_itself(switch: nn.Module | None) -> bool:
    """Whether the flag is on where the model reads it (while training)."""
    return switch is not None and bool(getattr(switch, _OWN_FLAG, False)) and switch.training


def checkpoints_itself(model: nn.Module) -> bool:
    """Whether a module of `model` has its Hugging Face checkpointing on (and trains): read
    from the flags, before any forward runs."""
    return any(_checkpoints_itself(m) for m in model.modules() if hasattr(m, _OWN_FLAG))


def _wrap(block: nn.Module, selective: bool, handle: CheckpointHandle,
          switch: nn.Module | None = None) -> None:
    inner = block.forward  # the bound method of the class (or a user's own override)
    positions = _cache_positions(inner)
    run = functools.partial(inner)   # marked: a checkpoint of memprof's (own_checkpointing)
    setattr(run, _MARK, handle)

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        if _checkpoints_itself(switch):   # turned on after apply (a Trainer's own switch)
            handle.say_own(len(handle.wrapped), len(handle.blocks), later=True)
            return inner(*args, **kwargs)
        args, kwargs = _without_cache(block, positions, args, kwargs)
        if selective:
            return checkpoint(run, *args, use_reentrant=False,
                              context_fn=_selective_context, **kwargs)
        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    functools.update_wrapper(forward, inner)
    setattr(forward, _MARK, handle)
    block.forward = forward


def apply(model: nn.Module, policy: str = "every",
          blocks: Sequence[nn.Module] | str | None = None) -> CheckpointHandle:
    """Checkpoint `model`'s repeated blocks with `policy` (see the module docstring).

    Returns a CheckpointHandle; `handle.remove()` restores the model. Raises ValueError for an
    unknown policy, a model without repeated blocks (when blocks= is not given) or a block
    that is already checkpointed by memprof.

    Blocks that checkpoint themselves (Hugging Face's activation checkpointing: a
    `gradient_checkpointing` flag on the block, or on the stack around it in older
    transformers) are left to the model's own checkpointing - wrapped again, a reentrant one
    ran each block a third time - listed in `handle.skipped`, with one UserWarning; a wrapped block whose own
    checkpointing is turned on later (a Trainer does it as training starts) runs as the model
    has it too. A `torch.utils.checkpoint` call in a forward has no flag and is not seen."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    kind, k = parse_policy(policy)
    if kind == "none":
        return CheckpointHandle(model, "none", "", [], [])
    container, mods = resolve_blocks(model, blocks)
    chosen = mods if kind in ("every", "selective") else mods[::k]
    for m in chosen:
        fwd = m.__dict__.get("forward")
        if fwd is not None and getattr(fwd, _MARK, None) is not None:
            raise ValueError(f"blocks: {type(m).__name__} in {container!r} is already "
                             "checkpointed by memprof; call .remove() on the first handle")
    handle = CheckpointHandle(model, policy, container, list(mods), [])
    names = {id(m): n for n, m in model.named_modules()}
    for m in chosen:
        switch = _own_switch(model, names.get(id(m)))
        if _checkpoints_itself(switch):
            handle.skipped.append(m)
            continue
        _wrap(m, kind == "selective", handle, switch)
        handle.wrapped.append(m)
    if handle.skipped:
        handle.say_own(len(handle.skipped), len(chosen))
    return handle


def policies_for(model: nn.Module, candidates: Iterable[str]) -> list[str]:
    """The candidate policies that apply to this model ('none' always; the others only if the
    model has repeated blocks; 'every-k' only if there are more than k blocks)."""
    out = []
    try:
        _, blocks = find_blocks(model)
    except ValueError:
        blocks = []
    for c in candidates:
        kind, k = parse_policy(c)
        if kind == "none" or (blocks and (kind != "every-k" or len(blocks) > k)):
            out.append(c)
    return out
