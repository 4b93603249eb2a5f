"""The loss of a step when the user gives none, and the Python that computes the same loss.

The model's own loss when its output carries one (`outputs.loss`, as Hugging Face models return
when the batch has labels; a dict's "loss"; or, when the batch gives no targets apart, a scalar
that needs a gradient in a returned tuple and is computed from its first tensor: nanoGPT's
`(logits, loss)`, whose loss read as "no targets" and was replaced by the logits' mean; not a
VAE's `(recon, kl)`, whose kl misses the decoder). Otherwise the first tensor of the output (`.logits`, a dict's first
value, a tuple's first item) against the targets: cross-entropy for integer targets (per token
when the targets have the output's leading shape), MSE for float targets, and the output's mean
when the batch has no targets (a stand-in scalar: its memory is that of any scalar loss).
One decision (`_decide`) serves both the estimate and the plan's code, so they cannot differ.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["default_loss", "loss_rule", "loss_code"]


def _decide(outputs, targets) -> tuple[str, str, object]:
    """-> (kind, path from the model's output to the tensor used, that tensor)."""
    own = getattr(outputs, "loss", None)
    if isinstance(own, torch.Tensor):
        return "own", ".loss", own
    if isinstance(outputs, dict) and _scalar(outputs.get("loss")):
        return "own", "['loss']", outputs["loss"]
    if isinstance(outputs, (tuple, list)) and targets is None:
        # the targets went in with the inputs (model(idx, targets)): the loss it returns
        at = [i for i, t in enumerate(outputs) if _scalar(t) and _made_from(t, outputs)]
        if at:
            return "own", f"[{at[0]}]", outputs[at[0]]
    out, path = outputs, ""
    if hasattr(out, "logits"):
        out, path = out.logits, ".logits"
    if isinstance(out, dict):
        key = next(iter(out))
        out, path = out[key], f"{path}[{key!r}]"
    if isinstance(out, (tuple, list)):
        out, path = out[0], f"{path}[0]"
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"loss: cannot make a loss of model output {type(outputs).__name__}; "
                        "pass loss=")
    if targets is None:
        return "mean", path, out
    if not targets.is_floating_point() and out.dim() >= 2:
        tokens = out.dim() > 2 and targets.shape == out.shape[:-1]
        return ("cross_entropy_tokens" if tokens else "cross_entropy"), path, out
    return "mse", path, out


#: autograd nodes walked from a returned scalar looking for the output's own node
MAX_WALK = 256


def _made_from(scalar, outputs) -> bool:
    """Whether `scalar`'s graph reaches the first other tensor returned (the logits): a loss
    of the whole output, as nanoGPT's. A VAE's `(recon, kl)` or a MoE's `(logits, aux_loss)`
    returns a scalar of one branch only; taken as the loss, the decoder's gradients and
    optimizer state dropped out of the estimate (5x too low)."""
    first = next((t for t in outputs if isinstance(t, torch.Tensor) and t is not scalar
                  and t.dim() > 0), None)
    if first is None or first.grad_fn is None:
        return first is None   # nothing else to reach: the scalar is all there is
    target, todo, seen = first.grad_fn, [scalar.grad_fn], set()
    while todo and len(seen) < MAX_WALK:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        if node is target:
            return True
        seen.add(id(node))
        todo.extend(n for n, _ in node.next_functions)
    return False


def _scalar(t) -> bool:
    """A loss as a model returns it: one floating value with a graph to differentiate."""
    return (isinstance(t, torch.Tensor) and t.dim() == 0 and t.is_floating_point()
            and t.requires_grad)


def _loss(kind: str, out, targets):
    if kind == "own":
        return out
    if kind == "mean":
        return out.float().mean()
    if kind == "cross_entropy_tokens":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))
    if kind == "cross_entropy":
        return F.cross_entropy(out, targets)
    return F.mse_loss(out, targets)


def default_loss(outputs, targets):
    """The loss described in the module docstring."""
    kind, _, out = _decide(outputs, targets)
    return _loss(kind, out, targets)


_CODE = {
    "mean": "loss = out.float().mean()  # stand-in: the batch has no targets; use your loss",
    "cross_entropy_tokens": "loss = torch.nn.functional.cross_entropy("
                            "out.reshape(-1, out.shape[-1]), y.reshape(-1))",
    "cross_entropy": "loss = torch.nn.functional.cross_entropy(out, y)",
    "mse": "loss = torch.nn.functional.mse_loss(out, y)",
}


def loss_code(rule: str, output: str, call: str) -> list[str]:
    """Lines that set `loss` as `rule` does, from the model call `call` (e.g. 'model(**x)')
    and the path `output` into its result; the targets are `y`."""
    if rule == "own":
        return [f"loss = {call}{output}  # the model's own loss (its batch has the targets)"]
    return [f"out = {call}{output}", _CODE[rule]]


def loss_rule(outputs, targets) -> dict:
    """{'rule', 'output'}: which rule `default_loss` applies to these outputs and targets, and
    the path from the model's result to the tensor it uses (for `loss_code`)."""
    rule, output, _ = _decide(outputs, targets)
    return {"rule": rule, "output": output}
