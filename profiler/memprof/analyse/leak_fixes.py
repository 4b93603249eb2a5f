"""The fix a leak finding suggests, chosen from what holds the graph: a running total, a KV
cache, a validation or metric computed with autograd on, copies of the weights (EMA), a list
or dict of outputs, a closure, a retain_graph=True, or state carried from step to step."""
from __future__ import annotations

import re

_REDUCTIONS = ("Add", "Sum", "Mean", "Div")
# a Hugging Face cache (`out['cache'].layers[0].keys`, `past_key_values`, older `key_cache`)
#: describe_unreached's name for an output a custom autograd.Function kept on its ctx
_ON_CTX = re.compile(r"\bctx\.(\w+) of ")
_KV_CACHE = re.compile(r"past_key_values|key_cache|value_cache|kv_cache|cache'?\]?\..*\.(keys|values)\b")


def fix_text(kind: str, names: list[str], paths: list[str], graphs, *, retained: bool,
             never_backward: bool, param_shapes: set, buffer: bool = False,
             carried: bool = False) -> str:
    """One sentence a user can act on for the holder `names` (paths inside it: `paths`);
    `buffer`: a graph tensor is a module's registered buffer; `carried`: every tensor held
    was made in the last step, its graph reaching back - state rebound each step (an LSTM's
    `hidden = (h, c)`), not a container that grows, even where a path indexes it."""
    where = " ".join(paths) or " ".join(names)
    scalar_total = (len(graphs) == 1 and graphs[0].numel == 1
                    and any(r in graphs[0].grad_fn for r in _REDUCTIONS))
    kept_in_container = any("[" in p for p in paths) and not carried
    if retained:
        also = ""
        if kind == "retained_graph":   # graphs of earlier steps: something keeps them too
            also = (" and keep `loss.item()` (or `.detach()`) in the container, which "
                    "keeps every step's graph even without it" if kept_in_container else
                    " and detach the state carried across steps (`h = h.detach()`)")
        return ("drop retain_graph=True (it keeps every saved tensor of the graph until the "
                f"last reference to it goes){also}; keep retain_graph only for a second "
                "backward through the same graph")
    on_ctx = _ON_CTX.search(where)
    if on_ctx:
        name = on_ctx.group(1)
        return (f"save the output with `ctx.save_for_backward({name})` (and read "
                f"`ctx.saved_tensors` in backward), not `ctx.{name} = {name}`: an output kept "
                "on its own ctx is a reference cycle (output -> grad_fn -> ctx -> output) that "
                "keeps each step's graph until Python's cyclic garbage collector runs")
    if buffer:
        return ("this module buffer is updated with autograd on, so each step's graph is "
                "chained into it: update it under `with torch.no_grad():` (or assign "
                "`.detach()`ed values), as BatchNorm does its running statistics")
    if _KV_CACHE.search(where):
        return ("the model returned its KV cache and it is kept: train with use_cache=False "
                "(model.config.use_cache = False), and keep only `.loss.item()` or "
                "`.logits.detach()` of the outputs")
    if scalar_total:
        return ("accumulate a number, not the graph: `total += loss.item()` (or "
                "`loss.detach()`)")
    if never_backward and graphs and all(_is_weight_copy(g, param_shapes) for g in graphs):
        return ("update these copies of the weights (EMA/SWA) under `with torch.no_grad():` "
                "(e.g. `e.mul_(d).add_(p, alpha=1 - d)`)")
    if never_backward:
        return ("this graph was built but never used by backward (validation, inference or "
                "metrics with autograd on): run that code under `with torch.no_grad():` or "
                "`torch.inference_mode()`, or keep `.detach()`ed results")
    if ".<closure" in where:
        return ("the closure captured tensors with their graph: capture `t.detach()` or "
                "`t.item()` instead, or call it before the next step")
    if kept_in_container:
        return ("keep `.detach()`ed tensors (or `.item()` for numbers) in the container, or "
                "don't keep them past the step")
    return ("detach state carried across steps (`h = h.detach()`), or drop the reference "
            "after backward")


def _is_weight_copy(g, param_shapes: set) -> bool:
    return bool(g.shape) and g.shape in param_shapes
