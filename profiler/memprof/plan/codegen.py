"""The Python a plan gives for applying one of its options (`Plan.code()`)."""
from __future__ import annotations

__all__ = ["plan_code"]


def _optimizer_code(opt, lr) -> str:
    lr_s = f"{lr:.4g}" if lr is not None else "lr"
    if isinstance(opt, str):
        name = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}.get(opt.lower(), opt)
        extra = ", momentum=0.9" if opt.lower() == "sgd" else ""
        return f"torch.optim.{name}(model.parameters(), lr={lr_s}{extra})"
    return f"make_optimizer(model.parameters())  # lr={lr_s}"


def _setup_lines(plan, o) -> list[str]:
    """Model, checkpointing, optimizer and scaler."""
    lines = ["import torch, memprof"]
    if plan.model.get("builtin"):
        extra = "".join(f", {k}={v!r}" for k, v in plan.model.get("kwargs", {}).items())
        lines.append(f"model, make_batch, loss_fn = memprof.models.build_model("
                     f"{plan.model['name']!r}{extra})")
    else:
        lines.append(f"model = {plan.model['name']}  # your model")
    lines.append("model.cuda().train()")
    if o.checkpointing != "none":
        where = f"{plan.container or 'repeated blocks'}"
        lines.append(f"handle = memprof.checkpoint.apply(model, {o.checkpointing!r})"
                     f"  # checkpoints {where}")
    lr = plan.lr.recommended_lr if plan.lr else None
    lines.append(f"opt = {_optimizer_code(plan.optimizer, lr)}")
    if o.precision == "fp16":
        lines.append('scaler = torch.amp.GradScaler("cuda")')
    return lines


def _loop_lines(plan, o) -> list[str]:
    """The training loop with accumulation and autocast."""
    low = o.precision in ("fp16", "bf16")
    call = plan.model.get("call", "model(x)")
    lines = [f"accumulation = {o.accumulation}  # micro-batch {o.micro_batch} x "
             f"{o.accumulation} = effective batch {o.micro_batch * o.accumulation}",
             f"for i, (x, y) in enumerate(loader):  # loader batch_size={o.micro_batch}"]
    ind = "    "
    if low:
        dtype = "torch.float16" if o.precision == "fp16" else "torch.bfloat16"
        extra = ", cache_enabled=False" if o.checkpointing == "selective" else ""
        lines.append(f'{ind}with torch.autocast("cuda", dtype={dtype}{extra}):')
        lines.append(f"{ind}    loss = loss_fn({call}, y) / accumulation")
    else:
        lines.append(f"{ind}loss = loss_fn({call}, y) / accumulation")
    if o.precision == "fp16":
        lines.append(f"{ind}scaler.scale(loss).backward()")
    else:
        lines.append(f"{ind}loss.backward()")
    lines.append(f"{ind}if (i + 1) % accumulation == 0:")
    if o.precision == "fp16":
        lines.append(f"{ind}    scaler.step(opt); scaler.update()")
    else:
        lines.append(f"{ind}    opt.step()")
    lines.append(f"{ind}    opt.zero_grad(set_to_none=True)")
    lines.append(f"{ind}    scheduler.step()  # LR schedule and warmup count optimizer steps")
    return lines


def plan_code(plan, option=None) -> str:
    """Python that applies `option` of `plan` (default: the best one)."""
    o = option or plan.best
    if o is None:
        return "# nothing fits: see the table (smaller effective batch, bigger GPU)"
    return "\n".join(_setup_lines(plan, o) + _loop_lines(plan, o))
