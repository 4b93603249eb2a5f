"""The Python a plan gives for applying one of its options (`Plan.code()`).

The code runs as written: it imports or defines every name it uses (the model's factory, the
batch function, the loss the estimate used, the optimizer), moves the model and each batch to
the GPU (the CPU when there is none, so that it can be tried anywhere), and loops over a stand-in
loader built from the batch function, to be replaced by the user's DataLoader of the same
micro-batch. Only what memprof was handed as an object it cannot import (a model built in
`__main__`) is left to the user, and the code says so.
"""
from __future__ import annotations

from .default_loss import loss_code

__all__ = ["plan_code"]

_DEVICE = 'device = "cuda" if torch.cuda.is_available() else "cpu"  # the plan is for the GPU'
_TO_DEVICE = ["def to_device(b):",
              "    if isinstance(b, torch.Tensor):",
              "        return b.to(device)",
              "    if isinstance(b, dict):",
              "        return {k: to_device(v) for k, v in b.items()}",
              "    if isinstance(b, (tuple, list)):",
              "        return type(b)(to_device(v) for v in b)",
              "    return b"]


def _import_line(spec: str, as_name: str | None = None) -> tuple[str, str]:
    """'pkg.mod:Outer.attr' -> ('from pkg.mod import Outer', 'Outer.attr'), or with `as_name`
    an import that binds the object itself to that name."""
    mod, _, qual = spec.partition(":")
    head = qual.split(".")[0]
    if as_name is not None and "." not in qual:
        return f"from {mod} import {qual} as {as_name}", as_name
    line = f"from {mod} import {head}"
    if as_name is not None:
        return f"{line}\n{as_name} = {qual}", as_name
    return line, qual


def _kwargs_code(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in (kwargs or {}).items())


def _batches_on_device(plan) -> bool:
    """A built-in's own batch function makes batches on the model's device."""
    return bool(plan.model.get("builtin") and plan.model.get("batch", {}).get("builtin"))


def _model_lines(plan) -> list[str]:
    """Lines that set `model` (and, for built-ins, `make_batch` and `loss_fn` unless the user
    gave their own, which `_batch_lines` / `_loss_imports` bind)."""
    m = plan.model
    if m.get("builtin"):
        batch = "make_batch" if m.get("batch", {}).get("builtin") else "_"
        loss = "loss_fn" if (m.get("loss") or {}).get("rule") == "builtin" else "_"
        return [f"model, {batch}, {loss} = memprof.models.build_model("
                f"{m['name']!r}{''.join(f', {k}={v!r}' for k, v in m['kwargs'].items())})",
                "model.to(device).train()"]
    spec = m.get("spec")
    if spec:
        line, name = _import_line(spec)
        lines = [line, f"model = {name}({_kwargs_code(m.get('kwargs'))})"]
    else:
        lines = [f"model = ...  # your {m['name']} (memprof was given an object it cannot "
                 "import)"]
    return lines + ["model.to(device).train()"]


def _batch_lines(plan) -> list[str]:
    """Lines that define `make_batch` (built-ins brought theirs with the model)."""
    b = plan.model.get("batch", {})
    if b.get("builtin"):
        return []
    if b.get("spec"):
        return [_import_line(b["spec"], as_name="make_batch")[0]]
    if "input_shape" in b:
        shape = ", ".join(str(s) for s in b["input_shape"])
        return ["def make_batch(b):  # the classification batch the plan estimated",
                f"    return (torch.randn(b, {shape}),), torch.randint(0, {b['num_classes']}, "
                "(b,))"]
    return ["make_batch = ...  # your batch function (memprof was given one it cannot import)"]


def _optimizer_lines(plan) -> list[str]:
    lr = plan.lr.recommended_lr if plan.lr else None
    lr_arg = f", lr={lr:.4g}" if lr is not None else ""
    opt = plan.optimizer
    if isinstance(opt, str) and opt.lower() in ("adamw", "adam", "sgd"):
        name = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}[opt.lower()]
        momentum = ", momentum=0.9" if opt.lower() == "sgd" else ""
        comment = "" if lr else "  # lr: torch's default; pass yours"
        return [f"opt = torch.optim.{name}(model.parameters(){lr_arg}{momentum}){comment}"]
    return [f"opt = ...  # your optimizer ({opt}){'' if lr is None else f', lr={lr:.4g}'}"]


def _setup_lines(plan, o) -> list[str]:
    """Device, model, batch function, checkpointing, optimizer, scaler, loader."""
    lines = [_DEVICE]
    lines += _model_lines(plan) + _batch_lines(plan)
    if not _batches_on_device(plan):
        lines += _TO_DEVICE
    if o.checkpointing != "none":
        where = f"{plan.container or 'repeated blocks'}"
        blocks = f", blocks={plan._blocks!r}" if isinstance(plan._blocks, str) else ""
        lines.append(f"handle = memprof.checkpoint.apply(model, {o.checkpointing!r}{blocks})"
                     f"  # checkpoints {where}")
    lines += _optimizer_lines(plan)
    w = plan.warmup
    if w is not None:
        n = max(1, int(w["warmup_optimizer_steps"]))
        lines.append(f"scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: "
                     f"min(1.0, (s + 1) / {n}))  # warmup in optimizer steps")
    if o.precision == "fp16":
        lines.append("scaler = torch.amp.GradScaler(device)")
    lines.append(f"accumulation = {o.accumulation}  # micro-batch {o.micro_batch} x "
                 f"{o.accumulation} = effective batch {o.micro_batch * o.accumulation}")
    lines.append(f"loader = (make_batch({o.micro_batch}) for _ in range(2 * accumulation))"
                 f"  # stand-in: your DataLoader, batch_size={o.micro_batch}")
    return lines


def _loss_lines(plan) -> list[str]:
    m = plan.model
    call = m.get("call", "model(x)")
    loss = m.get("loss") or {}
    if "output" in loss:
        return loss_code(loss["rule"], loss["output"], call)
    if loss.get("rule") == "builtin" or (loss.get("rule") == "given" and loss.get("spec")):
        return [f"loss = loss_fn({call}, y)"]
    return [f"loss = loss_fn({call}, y)  # loss_fn: yours (memprof was given one it cannot "
            "import)"]


def _loop_lines(plan, o) -> list[str]:
    """The training loop with accumulation, autocast and the loss the estimate used."""
    m = plan.model
    targets = m.get("targets", True)
    ind = "    "
    lines = [f"for i, {'(x, y)' if targets else 'x'} in enumerate(loader):"]
    if not _batches_on_device(plan):
        lines.append(f"{ind}x{', y' if targets else ''} = to_device(x)"
                     f"{', to_device(y)' if targets else ''}")
    body = _loss_lines(plan)
    if o.precision in ("fp16", "bf16"):
        dtype = "torch.float16" if o.precision == "fp16" else "torch.bfloat16"
        extra = ", cache_enabled=False" if o.checkpointing == "selective" else ""
        lines.append(f"{ind}with torch.autocast(device, dtype={dtype}{extra}):")
        lines += [f"{ind}    {b}" for b in body]
    else:
        lines += [f"{ind}{b}" for b in body]
    lines.append(f"{ind}loss = loss / accumulation")
    lines.append(f"{ind}{'scaler.scale(loss)' if o.precision == 'fp16' else 'loss'}.backward()")
    lines.append(f"{ind}if (i + 1) % accumulation == 0:")
    if o.precision == "fp16":
        lines.append(f"{ind}    scaler.step(opt)")
        lines.append(f"{ind}    scaler.update()")
    else:
        lines.append(f"{ind}    opt.step()")
    lines.append(f"{ind}    opt.zero_grad(set_to_none=True)")
    if plan.warmup is not None:
        lines.append(f"{ind}    scheduler.step()  # the schedule counts optimizer steps")
    return lines


def _loss_imports(plan) -> list[str]:
    loss = plan.model.get("loss") or {}
    if loss.get("rule") == "given" and loss.get("spec"):
        return [_import_line(loss["spec"], as_name="loss_fn")[0]]
    return []


def plan_code(plan, option=None) -> str:
    """Python that applies `option` of `plan` (default: the best one)."""
    o = option or plan.best
    if o is None:
        return "# nothing fits: see the table (smaller effective batch, bigger GPU)"
    parts = _setup_lines(plan, o) + _loss_imports(plan) + _loop_lines(plan, o)
    lines = "\n".join(parts).split("\n")
    imports = [ln for ln in lines if ln.startswith("from ")]
    body = [ln for ln in lines if not ln.startswith("from ")]
    head = ["import torch"] + (["import memprof"] if any("memprof." in ln for ln in body)
                               else [])
    return "\n".join(head + imports + body)
