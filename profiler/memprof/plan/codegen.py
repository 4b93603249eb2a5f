"""The Python a plan gives for applying one of its options (`Plan.code()`).

The code runs as written: it imports or defines every name it uses (the model's factory, the
batch function, the loss the estimate used, the optimizer), moves the model and each batch to
the GPU (the CPU when there is none, so that it can be tried anywhere), and loops over a stand-in
loader built from the batch function, to be replaced by the user's DataLoader of the same
micro-batch. Only what memprof was handed as an object it cannot import (a model built in
`__main__`) is left to the user, and the code says so.

A plan for N GPUs (`plan.distributed`) gives the script each rank runs under torchrun: the
process group from torchrun's environment (NCCL on GPUs; gloo and the CPU when there is no
GPU, so the same file can be tried as a CPU job), the device from LOCAL_RANK, and the
strategy's wrapping - DDP (ddp), DDP + ZeroRedundancyOptimizer (zero1), FSDP2 `fully_shard`
per block and at the root with `reshard_after_forward=False` (zero2: parameters stay
gathered from forward to backward, gradients and optimizer state sharded) or the default
True (zero3) - with the micro-step synchronisation the communication model assumes (DDP:
`no_sync()` until the last micro-step; FSDP: a reduce-scatter every micro-step) and the
learning rate of the global batch.
"""
from __future__ import annotations

import os

from .checkpoint import switch_names
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
_TORCH_DTYPES = {"fp16": "torch.float16", "bf16": "torch.bfloat16"}


def _to_device_lines(how) -> list[str]:
    """`to_device`; with converted weights (memprof.plan.precision) it converts the batch's
    tensors of their old dtype too (a bf16 batch into fp16 weights fails)."""
    if how.convert is None:
        return list(_TO_DEVICE)
    src, dst = (_TORCH_DTYPES[p] for p in how.convert)
    return [_TO_DEVICE[0], _TO_DEVICE[1],
            f"        return b.to(device, {dst}) if b.dtype == {src} else b.to(device)"] + \
        _TO_DEVICE[3:]


def _convert_lines(plan, how) -> list[str]:
    """The conversion of the model's half weights the plan estimated (bf16 -> fp16 on a GPU
    without bf16): tensors of the old dtype only (fp32 adapters stay fp32)."""
    if how.convert is None:
        return []
    src, dst = how.convert
    why = f"{plan.gpu.name} has no {src}" if not plan.gpu.supports(src) else "as planned"
    return [f"for t in list(model.parameters()) + list(model.buffers()):  # {why}: the {src} "
            f"weights as {dst} (the same bytes)",
            f"    if t.dtype == {_TORCH_DTYPES[src]}:",
            f"        t.data = t.data.to({_TORCH_DTYPES[dst]})"]


_WRAPPED_BY = {"ddp": "ddp", "zero1": "ddp", "zero2": "fsdp", "zero3": "fsdp"}


def _strategy(plan) -> str | None:
    """'ddp' | 'zero1' | 'zero2' | 'zero3' for a plan for N GPUs, else None."""
    dist = getattr(plan, "distributed", None)
    return dist.strategy.name if dist is not None else None


def _launch_lines(plan) -> list[str]:
    """How the script is started and how each rank finds its device and its peers."""
    d = plan.distributed
    if d.nodes > 1:
        launch = (f"torchrun --nnodes {d.nodes} --nproc-per-node {d.gpus_per_node} "
                  "--rdzv-backend c10d --rdzv-endpoint HOST:PORT train.py  (on every node)")
    else:
        launch = f"torchrun --nproc-per-node {d.world_size} train.py"
    return [f"# one process per GPU ({d.world_size} in all): {launch}",
            "import os",
            "import torch.distributed as dist",
            "local_rank = int(os.environ[\"LOCAL_RANK\"])  # torchrun sets RANK, LOCAL_RANK, "
            "WORLD_SIZE, MASTER_ADDR, MASTER_PORT",
            "if torch.cuda.is_available():",
            "    torch.cuda.set_device(local_rank)  # this rank's GPU: \"cuda\" below means it",
            "    device = \"cuda\"",
            "else:",
            "    device = \"cpu\"  # no GPU: the same job on the CPU (the plan is for the GPUs)",
            "dist.init_process_group(\"nccl\" if device == \"cuda\" else \"gloo\")  # rendezvous "
            "from torchrun's environment"]


def _unit_lines(plan) -> list[str]:
    """`fsdp_blocks = [...]`: the FSDP units the plan estimated (its repeated blocks)."""
    names = list(getattr(plan._estimator, "units", []) or [])
    if not names:
        return ["fsdp_blocks = []  # no repeated blocks: the root alone is one FSDP unit"]
    parents = {n.rpartition(".")[0] for n in names}
    index = [n.rpartition(".")[2] for n in names]
    if len(parents) == 1 and all(i.isdigit() for i in index):
        parent, ids = parents.pop(), [int(i) for i in index]
        seq = (f"range({ids[0]}, {ids[-1] + 1})" if ids == list(range(ids[0], ids[-1] + 1))
               else repr(tuple(ids)))
        name = f'f"{parent}.{{i}}"' if parent else "str(i)"
        return [f"fsdp_blocks = [model.get_submodule({name}) for i in {seq}]"]
    return [f"fsdp_blocks = [model.get_submodule(n) for n in {tuple(names)!r}]"]


def _wrap_lines(plan, o) -> list[str]:
    """The strategy's wrapping of `model` (before the optimizer sees its parameters)."""
    name = _strategy(plan)
    if _WRAPPED_BY[name] == "ddp":
        return ["from torch.nn.parallel import DistributedDataParallel as DDP",
                "model = DDP(model, device_ids=[local_rank] if device == \"cuda\" else None)"
                "  # gradients all-reduced in buckets"]
    reshard = "False" if name == "zero2" else "True"
    why = ("zero2: parameters stay gathered from forward to backward; gradients and optimizer "
           "state sharded" if name == "zero2" else
           "zero3: parameters gathered block by block, freed after use")
    lines = ["from torch.distributed.fsdp import fully_shard"]
    args = f"reshard_after_forward={reshard}"
    if o.precision in ("fp16", "bf16"):
        dtype = "torch.float16" if o.precision == "fp16" else "torch.bfloat16"
        lines += ["from torch.distributed.fsdp import MixedPrecisionPolicy",
                  f"mp_policy = MixedPrecisionPolicy(param_dtype={dtype}, "
                  "reduce_dtype=torch.float32)  # gathered in half precision, fp32 shards"]
        args += ", mp_policy=mp_policy"
    lines += _unit_lines(plan)
    lines += ["for block in fsdp_blocks:",
              f"    fully_shard(block, {args})  # {why}",
              f"fully_shard(model, {args})  # the root: every parameter not in a block"]
    return lines


def _import_line(spec: str, as_name: str | None = None) -> tuple[str, str]:
    """'pkg.mod:Outer.attr' -> ('from pkg.mod import Outer', 'Outer.attr'), or with `as_name`
    an import that binds the object itself to that name. A 'path/to/file.py:attr' (which
    recommend takes, as `python path/to/file.py` would find its imports) imports the file's
    module with its folder put first on the path: `from path/to/file.py import` is no Python."""
    mod, _, qual = spec.partition(":")
    head = qual.split(".")[0]
    if mod.endswith(".py") or "/" in mod or os.sep in mod:
        folder, name = os.path.split(os.path.abspath(mod))
        path_line = f"sys.path.insert(0, {folder!r})  # where {name} is"
        inner, bound = _import_line(f"{name[:-3] if name.endswith('.py') else name}:{qual}",
                                    as_name)
        return f"import sys\n{path_line}\n{inner}", bound
    if not all(part.isidentifier() for part in mod.split(".")):
        # importlib takes a module name the import statement cannot spell ('train-model')
        bound = as_name or head
        attrs = qual if as_name is not None else head
        return f"import importlib\n{bound} = importlib.import_module({mod!r}).{attrs}", \
            (as_name or qual)
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
    fsdp = _strategy(plan) and _WRAPPED_BY[_strategy(plan)] == "fsdp"
    seed = (["torch.manual_seed(0)  # the same initial weights on every rank: each keeps its "
             "shard of its own copy"] if fsdp else [])
    return seed + _built_model_lines(m, sharded=fsdp)


def _built_model_lines(m: dict, sharded: bool = False) -> list[str]:
    """The model's construction from the plan's model description, moved to `device` - or,
    `sharded`, left on the CPU: fully_shard moves each unit's parameters to the GPU as it
    shards them (the whole model moved first does not fit where only its shards do)."""
    place = ("model.train()  # on the CPU: fully_shard below moves it to the GPU unit by unit, "
             "as shards (each rank builds the whole model in host memory first; build it on "
             "the meta device and initialise after fully_shard where that is too much)"
             if sharded else "model.to(device).train()")
    if m.get("builtin"):
        batch = "make_batch" if m.get("batch", {}).get("builtin") else "_"
        loss = "loss_fn" if (m.get("loss") or {}).get("rule") == "builtin" else "_"
        return [f"model, {batch}, {loss} = memprof.models.build_model("
                f"{m['name']!r}{''.join(f', {k}={v!r}' for k, v in m['kwargs'].items())})",
                place]
    spec = m.get("spec")
    if spec:
        line, name = _import_line(spec)
        lines = [line, f"model = {name}({_kwargs_code(m.get('kwargs'))})"]
    else:
        lines = [f"model = ...  # your {m['name']} (memprof was given an object it cannot "
                 "import)"]
    return lines + [place]


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


def _optimizer_lines(plan, o) -> list[str]:
    lr = plan.lr.recommended_lr if plan.lr else None
    lr_arg = f", lr={lr:.4g}" if lr is not None else ""
    opt = plan.optimizer
    zero1 = _strategy(plan) == "zero1"
    batch = ""
    if _strategy(plan):
        batch = (f" the global batch {o.micro_batch * o.accumulation * plan.world_size} "
                 f"(micro-batch {o.micro_batch} x accumulation {o.accumulation} x "
                 f"{plan.world_size} ranks)")
    if isinstance(opt, str) and opt.lower() in ("adamw", "adam", "sgd"):
        name = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}[opt.lower()]
        momentum = ", momentum=0.9" if opt.lower() == "sgd" else ""
        comment = (f"  # lr for{batch}" if lr and batch else "" if lr else
                   f"  # lr: torch's default; pass yours{f', scaled to{batch}' if batch else ''}")
        if zero1:
            return ["from torch.distributed.optim import ZeroRedundancyOptimizer",
                    f"opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class="
                    f"torch.optim.{name}{lr_arg}{momentum})  # each rank keeps 1/world of the "
                    f"optimizer state{comment.replace('  #', ';', 1)}"]
        return [f"opt = torch.optim.{name}(model.parameters(){lr_arg}{momentum}){comment}"]
    if isinstance(opt, str) and opt.lower() == "none":   # ("opt = ..." then opt.step() failed)
        return ["opt = torch.optim.SGD(model.parameters(), lr=0.0)  # --optimizer none: "
                "estimated without optimizer state; this one holds none and changes nothing "
                "(a GradScaler needs one): put your own update in its place"]
    lr_note = "" if lr is None else f", lr={lr:.4g}{f' for{batch}' if batch else ''}"
    if zero1:
        return ["from torch.distributed.optim import ZeroRedundancyOptimizer",
                f"opt = ...  # your optimizer ({opt}){lr_note}, as ZeroRedundancyOptimizer("
                "model.parameters(), optimizer_class=YourOptimizer, **its_arguments)"]
    return [f"opt = ...  # your optimizer ({opt}){lr_note}"]


def _setup_lines(plan, o) -> list[str]:
    """Device, model, batch function, checkpointing, optimizer, scaler, loader."""
    how = plan.training(o.precision)
    lines = _launch_lines(plan) if _strategy(plan) else [_DEVICE]
    lines += _model_lines(plan) + _convert_lines(plan, how) + _batch_lines(plan)
    if not _batches_on_device(plan):
        lines += _to_device_lines(how)
    if o.own_checkpointing:   # what the estimate ran: the model's checkpoints stay on
        lines.append(f"# the model checkpoints its blocks itself ({switch_names()[0]}()"
                     " or torch.utils.checkpoint), as estimated: keep that on")
    if o.checkpointing != "none" and o.policy_applied:   # else: it left every block to them
        where = f"{plan.container or 'repeated blocks'}"
        blocks = f", blocks={plan._blocks!r}" if isinstance(plan._blocks, str) else ""
        lines.append(f"handle = memprof.checkpoint.apply(model, {o.checkpointing!r}{blocks})"
                     f"  # checkpoints {where}")
    if _strategy(plan):
        lines += _wrap_lines(plan, o)
    lines += _optimizer_lines(plan, o)
    w = plan.warmup_for(o)   # this option's accumulation, not the best one's
    if w is not None:
        n = max(1, int(w["warmup_optimizer_steps"]))
        lines.append(f"scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: "
                     f"min(1.0, (s + 1) / {n}))  # warmup in optimizer steps")
    if how.grad_scaler:
        lines.append("scaler = torch.amp.GradScaler(device)")
    if _strategy(plan):
        lines.append(f"accumulation = {o.accumulation}  # micro-batch {o.micro_batch} x "
                     f"{o.accumulation} x {plan.world_size} ranks = global batch "
                     f"{o.micro_batch * o.accumulation * plan.world_size}")
        lines.append(f"loader = (make_batch({o.micro_batch}) for _ in range(2 * accumulation))"
                     f"  # stand-in: your DataLoader(dataset, batch_size={o.micro_batch}, "
                     "sampler=DistributedSampler(dataset)) - each rank its own share; call "
                     "sampler.set_epoch(epoch) every epoch")
        return lines
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
    # what to know about the precision (no loss scaling, a model that overflows fp16)
    lines = [f"# note: {n}" for n in plan.notes(o)]
    batch = "(x, y)" if targets else "(x, _)" if m.get("pair") else "x"   # (inputs, None)
    lines.append(f"for i, {batch} in enumerate(loader):")
    if not _batches_on_device(plan):
        lines.append(f"{ind}x{', y' if targets else ''} = to_device(x)"
                     f"{', to_device(y)' if targets else ''}")
    body = _loss_lines(plan)
    how = plan.training(o.precision)
    if how.autocast:
        dtype = _TORCH_DTYPES[o.precision]
        extra = ", cache_enabled=False" if o.checkpointing == "selective" else ""
        body = [f"with torch.autocast(device, dtype={dtype}{extra}):"] + [f"    {b}" for b in body]
    body.append("loss = loss / accumulation")
    body.append(f"{'scaler.scale(loss)' if how.grad_scaler else 'loss'}.backward()")
    if o.accumulation > 1 and _strategy(plan) and _WRAPPED_BY[_strategy(plan)] == "ddp":
        lines.append(f"{ind}last_micro_step = (i + 1) % accumulation == 0")
        lines.append(f"{ind}with contextlib.nullcontext() if last_micro_step else model.no_sync():"
                     "  # all-reduce once per optimizer step")
        body = [f"    {b}" for b in body]
    lines += [f"{ind}{b}" for b in body]
    lines.append(f"{ind}if (i + 1) % accumulation == 0:")
    if how.grad_scaler:
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
    if _strategy(plan):
        parts.append("dist.destroy_process_group()")
    lines = "\n".join(parts).split("\n")
    top = list(dict.fromkeys(ln for ln in lines if ln.startswith(
        ("from ", "import ", "sys.path.insert(", "# one process per GPU"))))
    body = [ln for ln in lines if ln not in top]
    head = (top[:1] if top and top[0].startswith("#") else []) + ["import torch"]
    if any("contextlib." in ln for ln in body):
        head.append("import contextlib")
    head += [ln for ln in top if ln.startswith("import ")]
    if any("memprof." in ln for ln in body):
        head.append("import memprof")
    head += [ln for ln in top if ln.startswith("sys.path.insert(")]   # before the imports
    return "\n".join(head + [ln for ln in top if ln.startswith("from ")] + body)
