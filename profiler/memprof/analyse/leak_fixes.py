"""The fix a leak finding suggests, chosen from what holds the graph: a running total, a KV
cache, a validation or metric computed with autograd on, copies of the weights (EMA), a list
or dict of outputs, a closure, a retain_graph=True, or state carried from step to step."""
from __future__ import annotations

import re

_REDUCTIONS = ("Add", "Sum", "Mean", "Div")
# a Hugging Face cache (`out['cache'].layers[0].keys`, `past_key_values`, older `key_cache`)
_KV_CACHE = re.compile(r"past_key_values|key_cache|value_cache|kv_cache|cache'?\]?\..*\.(keys|values)\b")


def fix_text(kind: str, names: list[str], paths: list[str], graphs, *, retained: bool,
             never_backward: bool, param_shapes: set) -> str:
    """One sentence a user can act on for the holder `names` (paths inside it: `paths`)."""
    where = " ".join(paths) or " ".join(names)
    scalar_total = (len(graphs) == 1 and graphs[0].numel == 1
                    and any(r in graphs[0].grad_fn for r in _REDUCTIONS))
    if retained:
        carried = (" and detach the state carried across steps (`h = h.detach()`)"
                   if kind == "retained_graph" else "")
        return ("drop retain_graph=True (it keeps every saved tensor of the graph until the "
                f"last reference to it goes){carried}; keep retain_graph only for a second "
                "backward through the same graph")
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
    if any("[" in p for p in paths):
        return ("keep `.detach()`ed tensors (or `.item()` for numbers) in the container, or "
                "don't keep them past the step")
    return ("detach state carried across steps (`h = h.detach()`), or drop the reference "
            "after backward")


def _is_weight_copy(g, param_shapes: set) -> bool:
    return bool(g.shape) and g.shape in param_shapes
