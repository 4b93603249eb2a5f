"""Why the plain training step of a plan failed: the model's own error, or fake tensors'.

A model that raises by itself (T5 built without a decoder start token raises a ValueError in
any forward with labels) was reported as "a training step failed under fake tensors", and
the user hunted a fake-tensor problem that did not exist. Two cheap tells, in this order:

- where it was raised (`origin`, read in the process that ran the estimate, where the
  traceback lives): a `raise` in code outside torch and memprof is the model's (or its loss's,
  or batch's) own; it costs nothing.
- an error raised inside torch (a shape mismatch, or an op fake tensors cannot run) is
  ambiguous: the same step runs once without fake tensors (`plain_step_raises`), on a copy of
  the model, only where that is cheap and safe - a model on the CPU with real weights (never
  a meta-built one) of at most `PLAIN_STEP_MAX_PARAMS` parameters. Measured on 2 shared
  cores: ~20 ms for a tiny model, 3.5 s for a 41M-parameter BERT at 128 tokens; on the
  failure path only.

A TypeError whose batch the forward's signature cannot take (a batch function returning
(x, y, w): all inputs, model(*x)) is the batch function's, and named so (`batch_mismatch`).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import os
import sysconfig
import traceback
import warnings

import torch

__all__ = ["origin", "raised_at", "plain_step_raises", "explain", "batch_mismatch",
           "PLAIN_STEP_MAX_PARAMS"]

#: the largest model (parameters) whose failing step is run once more without fake tensors
PLAIN_STEP_MAX_PARAMS = 20_000_000

_TORCH = os.path.dirname(torch.__file__) + os.sep
_MEMPROF = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"]) + os.sep


def _short(path: str) -> str:
    """A source path as a user finds it: from its package on, or relative to here."""
    cut = path.rfind("site-packages" + os.sep)
    if cut >= 0:
        return path[cut + len("site-packages") + 1:]
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _frames(exc: BaseException):
    """(frame, whether torch's or memprof's) of `exc`'s traceback, innermost first; the
    standard library's frames are looked through: they ran on the caller's behalf."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = os.path.realpath(frame.filename)
        if path.startswith(_STDLIB) and "site-packages" not in path:
            continue
        yield frame, path.startswith((_TORCH, _MEMPROF)) or frame.filename.startswith("<")


def origin(exc: BaseException) -> str | None:
    """'file:line' of the code that raised `exc` when it is neither torch's nor memprof's
    (the model's, its loss's or its batch's own), else None."""
    for frame, library in _frames(exc):
        return None if library else f"{_short(frame.filename)}:{frame.lineno}"
    return None


def raised_at(exc: BaseException) -> str:
    """Where `exc` came from, to tell failures apart without their text (which may name a
    batch size: 'batch 1235 too big' and 'batch 1133 too big' are one failure): 'file:line'
    of the innermost frame of the user's code (its raise, or its call into torch), else of
    the innermost frame."""
    frames = list(_frames(exc))
    frame = next((f for f, library in frames if not library), frames[0][0] if frames else None)
    return "" if frame is None else f"{_short(frame.filename)}:{frame.lineno}"


def plain_step_raises(estimator, batch_size: int, precision: str) -> str | None | bool:
    """Run the estimate's step once more without fake tensors (forward, loss, backward; no
    optimizer step) on a copy of the user's model -> the type name of what it raises, False
    when it runs, None when it is not tried (see the module docstring). The user's model,
    gradients and random state are left as they were."""
    model = getattr(estimator, "_user_model", None)
    if model is None:
        return None
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.device.type != "cpu" for t in tensors) or \
            sum(p.numel() for p in model.parameters()) > PLAIN_STEP_MAX_PARAMS:
        return None
    from .amp_wrapper import unwrapped_forward
    from .cuda_autocast import LOW_PRECISION_DTYPES
    from .estimate import call_model, split_batch
    from .precision import training
    low = LOW_PRECISION_DTYPES.get(precision) \
        if training(estimator.model_precision, precision).autocast else None
    amp = torch.autocast("cpu", dtype=low) if low is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with unwrapped_forward(model):   # (the precision asked, not accelerate's)
                twin = copy.deepcopy(model).train(model.training)
            inputs, targets = split_batch(estimator._rebind(estimator.make_batch, twin)(
                batch_size))
            with amp:
                loss = estimator._rebind(estimator.loss_fn, twin)(call_model(twin, inputs),
                                                                  targets)
            loss.backward()
        except Exception as e:  # noqa: BLE001  (what it raises is the answer)
            return type(e).__name__
    return False


def _hint(batch_fn: str, call: str, pair: bool) -> str:
    x = "x, y" if pair else "x"
    return (f"hint: one plain step shows it without memprof: {x} = {batch_fn}(2); "
            f"out = {call}; then the loss and loss.backward()")


def explain(model_name: str, name: str, message: str, where: str | None, plain,
            batch_fn: str, form: dict) -> str:
    """The one line (and hint line) for a plain step that failed with `name: message`:
    `where` the model's own code that raised it (origin), `plain` what a plain step did
    (plain_step_raises), `form` how the batch is called (workloads.batch_form)."""
    said = f"{name}: {message}"
    hint = _hint(batch_fn, form.get("call", "model(x)"), form.get("pair", False))
    if where is not None:
        return (f"model {model_name}: its training step raises {said} (the model's own code, "
                f"at {where}; not a fake-tensor problem)\n{hint}")
    if plain == name:
        return (f"model {model_name}: its training step raises {said} (a plain step on the "
                f"CPU raises it too; not a fake-tensor problem)\n{hint}")
    if plain is False:
        return (f"model {model_name}: a training step failed under fake tensors: {said} (a "
                "plain step on the CPU runs)")
    return (f"model {model_name}: a training step failed under fake tensors: {said}\n"
            f"hint: if a plain step raises it too, it is the model's own error: {hint[6:]}")


def _returned(batch) -> str:
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}"
    if isinstance(batch, dict):
        return f"a dict of {', '.join(map(str, batch))}"
    return "a tensor" if isinstance(batch, torch.Tensor) else type(batch).__name__


def batch_mismatch(model, make_batch, batch_fn: str) -> str | None:
    """The one line for a batch the model's forward cannot take as memprof calls it (a
    TypeError of the step: a batch function returning (x, y, w) is all inputs, model(*x), and
    read "Sequential.forward() takes 2 positional arguments but 4 were given" under "failed
    under fake tensors"); None when the forward's signature takes it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .estimate import quiet_fake_tensor_log, split_batch
    try:
        sig = inspect.signature(model.forward)
        with FakeTensorMode(), quiet_fake_tensor_log():
            batch = make_batch(2)
    except Exception:  # noqa: BLE001  (no answer here: the step's own error is said)
        return None
    inputs, _ = split_batch(batch)
    if isinstance(inputs, dict):
        args, kwargs, call = (), inputs, "model(**x)"
    elif isinstance(inputs, (tuple, list)):
        args, kwargs, call = tuple(inputs), {}, "model(*x)"
    else:
        args, kwargs, call = (inputs,), {}, "model(x)"
    try:
        sig.bind(*args, **kwargs)
        return None
    except TypeError as e:
        why = str(e)
    names = [p.name for p in sig.parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes = f"{len(names)} input{'s' if len(names) != 1 else ''} ({', '.join(names)})"
    pair = isinstance(batch, (tuple, list)) and len(batch) == 2
    read = "(inputs, targets): the inputs x" if pair else \
        "all inputs x (only a pair is (inputs, targets))"
    return (f"batch function {batch_fn!r} returned {_returned(batch)}, {read}, called as "
            f"{call}, but {type(model).__name__}.forward() takes {takes}: {why}; expected "
            "(inputs, targets), or the inputs alone, as the forward takes them")
