"""What a plan estimates: a model, a batch function and a loss, from what the user names.

A model is a built-in name (`memprof.models.MODELS`, which bring their batch and loss), a
factory given as 'package.module:factory' (imported here), a factory () -> nn.Module, or an
nn.Module. A batch function is batch_size -> (inputs, targets) or inputs alone, also as
'package.module:function'; without one, `input_shape` makes a classification batch (classes
inferred from the model's output unless given). Without a loss, `default_loss` applies (the
model's own `outputs.loss` when it returns one). The description returned says how to import
each of them again (for the plan's code). Every bad input is a one-line PlanInputError.
"""
from __future__ import annotations

import importlib
import numbers
import os
import re
import sys
from typing import Any, Callable

import torch
import torch.nn as nn

from ..record.throughput import leading_dim
from .errors import PlanInputError
from .estimate import quiet_fake_tensor_log, split_batch
from .meta_build import build, fake_like

__all__ = ["resolve_workload", "batch_form", "importable_name", "own_batch_size",
           "BatchError"]


class BatchError(Exception):
    """The user's batch function raised (message: one line naming it)."""


# ------------------------------------------------------------------------------ importing
def _import_callable(spec: str, label: str) -> Callable:
    """'package.module:name' (dotted attributes allowed) -> the callable; one-line errors that
    start with `label` ('model', 'batch function')."""
    mod_name, _, attr = spec.partition(":")
    mod_name = _module_name_of_file(mod_name, spec, label)
    try:
        obj = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001
        raise PlanInputError(f"{label} {spec!r}: cannot import {mod_name} ({type(e).__name__}: "
                             f"{e})") from None
    missing = object()
    for part in attr.split("."):
        obj = getattr(obj, part, missing)
        if obj is missing:
            raise PlanInputError(f"{label} {spec!r}: {mod_name} has no function or class "
                                 f"{attr!r}")
    if not callable(obj):
        value = repr(obj) if len(repr(obj)) <= 40 else f"<{type(obj).__name__}>"
        raise PlanInputError(f"{label} {spec!r}: {mod_name}.{attr} = {value} is not a "
                             "function or class")
    return obj


def _module_name_of_file(mod_name: str, spec: str, label: str) -> str:
    """`path/to/models.py` (what a user types first) -> `models`, its folder first on the import
    path (as `python path/to/models.py` would put it: its own imports are found beside it);
    a module name as it is (`pkg.py` is the module `py` of `pkg` unless such a file exists)."""
    is_path = "/" in mod_name or os.sep in mod_name or \
        (mod_name.endswith(".py") and os.path.isfile(mod_name))
    if not is_path:
        return mod_name
    path = os.path.abspath(mod_name)
    if not mod_name.endswith(".py"):
        raise PlanInputError(f"{label} {spec!r}: expected 'module:function' (a module on the "
                             "import path, the current directory first) or "
                             "'path/to/file.py:function'")
    if not os.path.isfile(path):
        raise PlanInputError(f"{label} {spec!r}: no such file {mod_name!r}")
    folder, name = os.path.split(path)
    name = name[:-len(".py")]
    loaded = getattr(sys.modules.get(name), "__file__", None)
    if loaded is not None and os.path.abspath(loaded) != path:
        raise PlanInputError(f"{label} {spec!r}: a module named {name!r} is already imported "
                             f"from {loaded}; rename the file or give it as module:function")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return name


def importable_name(obj) -> str | None:
    """'module:qualname' by which a plan's code can import `obj`, or None (defined in
    __main__ or inside a function)."""
    mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not mod or not qual or mod == "__main__" or "<locals>" in qual:
        return None
    return f"{mod}:{qual}"


def check_model_spec(spec: str) -> None:
    """Raise the one-line PlanInputError for a model that is neither a built-in name nor a
    'package.module:factory' that can be imported and called (before other advice about the
    command line)."""
    if ":" not in spec:
        from ..models import MODELS
        if spec not in MODELS:
            _user_model(spec, None, MODELS)   # raises its one line
        return
    _import_factory(spec)


def _import_factory(spec: str) -> Callable:
    if ":" not in spec or not all(spec.partition(":")[::2]):
        raise PlanInputError(f"model {spec!r}: expected a built-in name or "
                             "'package.module:factory'")
    return _import_callable(spec, "model")


def _load_batch_fn(spec) -> Callable:
    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise PlanInputError(f"batch function {spec!r}: expected 'package.module:function'")
    return _import_callable(spec, "batch function")


def own_batch_size(batch) -> int | None:
    """The batch size a batch function makes by default (its first parameter's default, as
    in `def batch(batch_size=32)`), or None when it has none."""
    import inspect
    fn = _load_batch_fn(batch)
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    default = params[0].default if params else inspect.Parameter.empty
    if isinstance(default, int) and not isinstance(default, bool) and default >= 1:
        return default
    return None


# ------------------------------------------------------------------------------ batches
def _parse_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, str):
        try:   # 3,224,224 or 3x224x224; every part a number ("3,x,32" is not 3,32)
            shape = tuple(int(s) for s in re.split(r"[,x]", shape.strip()))
        except ValueError:
            raise PlanInputError(f"input shape {shape!r}: expected integers such as "
                                 "3,224,224", "input shape") from None
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise PlanInputError(f"input shape {shape!r}: expected positive integers such as "
                             "3,224,224", "input shape")
    return shape


def _classification_batch(shape, num_classes):
    def make_batch(b):
        return (torch.randn(b, *shape),), torch.randint(0, num_classes, (b,))
    return make_batch


def _fake_copy(model: nn.Module):
    """(fake mode, a copy of `model` on fake tensors) for a forward that allocates nothing."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    import copy
    fm = FakeTensorMode(allow_non_fake_inputs=True)
    memo = {id(t): fake_like(fm, t) for t in list(model.parameters()) + list(model.buffers())}
    return fm, copy.deepcopy(model, memo)


def _infer_num_classes(model: nn.Module, shape) -> int:
    fm, m = _fake_copy(model)
    try:
        with fm, torch.no_grad(), quiet_fake_tensor_log():
            out = m(torch.randn(2, *shape))
    except Exception as e:  # noqa: BLE001
        raise PlanInputError(f"input shape {shape}: the model rejects a batch of this shape "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                             "input shape") from None
    if hasattr(out, "logits"):
        out = out.logits
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise PlanInputError("num_classes: cannot infer it from the model's output; pass it")
    return int(out.shape[-1])


def _num_classes(model: nn.Module, shape, given, own_loss: bool = True) -> int:
    """The classes of the classification batch: `given` where it matches the model's output
    (0 was ignored, -3 blamed a batch function the user never wrote, and 1000 on a 10-output
    model printed code that failed on its first target), else the model's."""
    if given is not None and (isinstance(given, bool) or not isinstance(given, numbers.Integral)
                              or given < 1):
        raise PlanInputError(f"num_classes: expected a whole number >= 1, got {given!r}")
    if given is not None and not own_loss:   # the user's loss reads the output as it will
        return int(given)
    try:
        inferred = _infer_num_classes(model, shape)
    except PlanInputError:
        if given is None:
            raise
        return int(given)
    if given is not None and given != inferred:
        raise PlanInputError(f"num_classes {given}: the model's output has {inferred} "
                             "classes (its last dimension); give that or leave it out")
    return inferred


def _checked_batch(fn):
    name = getattr(fn, "__name__", fn)

    def make_batch(b):
        try:
            batch = fn(b)
        except Exception as e:  # noqa: BLE001
            said = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            if "DataDependent" in type(e).__name__ or "_local_scalar_dense" in said:
                said += ("; it runs on fake tensors, which have shapes but no values: make the "
                         "batch from its size alone (no .item(), .tolist() or printing values)")
            raise BatchError(f"batch function {name!r} raised {said}") from None
        # a function that ignores its argument makes every estimate one of its own size
        # (the batch size as the tracker reads a pass's: its first tensor's first dimension)
        # (a batch whose batch dimension is another - memprof.plan.fit's rebuilt (seq,
        # batch, feature) inputs - says so in `batch_dim`, and is made at that size)
        n = leading_dim((batch,)) if not getattr(fn, "batch_dim", 0) else None
        if n is not None and n != b:
            raise BatchError(f"batch function {name!r} returned {n} samples when asked for "
                             f"{b} (its first tensor's first dimension): it must make a batch "
                             "of the size it is given")
        return batch
    make_batch.__name__ = getattr(fn, "__name__", "make_batch")
    return make_batch


def batch_form(make_batch) -> dict:
    """How the plan's code calls the model on a batch, read from one fake batch: 'call' is
    model(x), model(*x) (DCAL's image pair) or model(**x); 'targets' whether the batch is an
    (inputs, targets) pair or inputs alone."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415
    try:
        with FakeTensorMode(), quiet_fake_tensor_log():
            batch = make_batch(1)
            inputs, targets = split_batch(batch)
    except Exception:  # noqa: BLE001  (the estimates report a broken batch function)
        return {"call": "model(x)", "targets": True}
    call = "model(**x)" if isinstance(inputs, dict) else \
        "model(*x)" if isinstance(inputs, (tuple, list)) else "model(x)"
    # `(inputs, None)`: a pair without targets (the code called model(**x) on the pair)
    pair = isinstance(batch, (tuple, list)) and len(batch) == 2
    return {"call": call, "targets": targets is not None, "pair": pair}


# ------------------------------------------------------------------------------ models
def _builtin(name: str, model_kwargs):
    """A built-in workload -> (module, make_batch, loss_fn, description)."""
    from ..models import build_model, check_options
    try:
        check_options(name, dict(model_kwargs or {}), given_as="--model-arg / model_kwargs")
        # on meta (memprof.plan.meta_build): no weights to initialise, nothing to convert
        wl, built_on = build(lambda **kw: build_model(name, **kw), dict(model_kwargs or {}),
                             name)
    except (TypeError, ValueError) as e:  # an unknown or bad --model-arg
        raise PlanInputError(f"model {name}: {e}") from None
    desc = {"name": name, "builtin": True, "kwargs": dict(model_kwargs or {}),
            "built_on": built_on}
    return wl.model, wl.make_batch, wl.loss_fn, desc


def _user_model(model, model_kwargs, builtins) -> tuple[nn.Module, dict]:
    """A factory spec, a factory or a module -> (module, description)."""
    if isinstance(model, str):
        if ":" not in model:
            raise PlanInputError(
                f"model {model!r}: not a built-in ({', '.join(builtins)}) and not "
                "'package.module:factory' (a Hugging Face model: a function in your module that "
                "builds it from its config, e.g. GPT2LMHeadModel(GPT2Config()), given as "
                "--model mymodels:build with --batch-fn mymodels:tokens)")
        factory = _import_factory(model)
        desc = {"name": model.split(":")[-1] + "()", "builtin": False, "spec": model}
        desc["kwargs"] = dict(model_kwargs or {})
    elif isinstance(model, nn.Module):
        return model, {"name": type(model).__name__, "builtin": False}
    elif callable(model):
        factory = model
        desc = {"name": getattr(model, "__name__", "factory") + "()", "builtin": False,
                "spec": importable_name(model), "kwargs": dict(model_kwargs or {})}
    else:
        raise PlanInputError(f"model: expected a built-in name, 'package.module:factory', a "
                             f"factory or an nn.Module, got {type(model).__name__}")
    try:
        module, desc["built_on"] = build(factory, dict(model_kwargs or {}), desc["name"])
    except PlanInputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise PlanInputError(f"model {desc['name']}: the factory raised "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(module, nn.Module):
        raise PlanInputError(f"model {desc['name']}: the factory returned "
                             f"{type(module).__name__}, expected a torch.nn.Module")
    return module, desc


def resolve_workload(model, batch, loss, input_shape, num_classes, model_kwargs):
    """-> (nn.Module, make_batch, loss_fn, description dict); see the module docstring.
    Without a loss (loss_fn None: `default_loss`), the description has no "loss": which rule
    applies is read off the estimates (`Estimate.loss_rule`), not from a forward here."""
    from ..models import MODELS
    desc: dict[str, Any]
    loss_fn = loss
    make_batch = _load_batch_fn(batch) if batch is not None else None
    if isinstance(model, str) and model in MODELS:
        for name, given in (("input_shape", input_shape), ("num_classes", num_classes)):
            if given is not None:   # it would be ignored: the built-in makes its own batches
                raise PlanInputError(f"{name} {given!r}: not used with the built-in model "
                                     f"{model!r}, which makes its own batches; its own "
                                     "arguments go in model_kwargs (--model-arg key=value)")
        module, own_batch, own_loss, desc = _builtin(model, model_kwargs)
        desc["batch"] = {"builtin": True} if make_batch is None else {}
        desc["loss"] = {"rule": "builtin"} if loss_fn is None else {}
        make_batch = make_batch or own_batch
        loss_fn = loss_fn or own_loss
    else:
        module, desc = _user_model(model, model_kwargs, MODELS)
        if make_batch is None:
            if input_shape is None:
                raise PlanInputError(f"model {desc['name']}: give input_shape (--input-shape "
                                     "3,224,224) for a classification batch, or a batch "
                                     "function")
            shape = _parse_shape(input_shape)
            n = _num_classes(module, shape, num_classes, own_loss=loss_fn is None)
            make_batch = _classification_batch(shape, n)
            desc["batch"] = {"input_shape": list(shape), "num_classes": int(n)}
    if batch is not None:
        desc["batch"] = {"spec": batch if isinstance(batch, str) else importable_name(batch)}
    if loss_fn is not None and not desc.get("loss"):
        desc["loss"] = {"rule": "given", "spec": importable_name(loss_fn)}
    if make_batch is not None:
        make_batch = _checked_batch(make_batch)
    return module, make_batch, loss_fn, desc
