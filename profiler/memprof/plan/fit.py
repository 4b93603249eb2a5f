"""What would fit instead of a step that ran out of memory: estimates, and said to be.

Two ways, by what is known:

* `scaled_fit(profile, capacity, step)`: from the profile alone (a saved file, `memprof report
  --budget`). The recorded stream up to the end of that step is replayed through the
  caching-allocator model with the batch-dependent allocations (activations and temporaries
  of forward and backward; not a weight recomputed from parameters - weight_norm, a
  parametrization - nor its gradient: memprof.weight_recomputation) scaled to a smaller
  micro-batch, and - for the micro-steps 2..A of
  gradient accumulation - the step's gradients alive from its start. The largest micro-batch
  whose replay fits is the answer. Linear scaling of activations with the batch is the
  assumption; parameters, gradients and optimizer state stay as recorded.
* `re_estimate(model, inputs, ...)`: with the model at hand (`memprof.track(model, ...)`),
  the step is re-estimated on fake tensors (`memprof.plan.search.recommend`, restricted to the
  precision the run used plus one lower AMP precision, and no / every-block checkpointing;
  a precision the GPU cannot run - bf16 on a V100 - is replaced by those it can: fp16 with
  GradScaler and fp32, or for bf16 weights their conversion to fp16: `memprof.plan.precision`),
  with a batch of the recorded inputs' structure (`memprof.record.inputs`) at each
  micro-batch; the loss is the mean of the output (the run's targets are not seen), the
  optimizer is the run's (same class and defaults).
"""
from __future__ import annotations

import bisect
import inspect
import math
import time

import numpy as np
import torch

from ..analyse.throughput import micro_steps
from ..profile import Profile
from ..record.events import (CAT_ACTIVATIONS, CAT_GRADIENTS, CAT_OTHER, CAT_RECOMPUTED_WEIGHTS,
                             CAT_TEMPORARIES, PHASE_BACKWARD, PHASE_FORWARD, PHASE_OTHER)
from ..units import fmt_bytes
from ..weight_recomputation import weight_gradients
from .allocator import simulate
from .precision import default_precisions, model_precision, notes, unsupported
from .streams import step_stream

SCALED = "the recorded step scaled to a smaller micro-batch, replayed through the allocator model"
ESTIMATED = "re-estimated on fake tensors (memprof.plan.estimate)"


# ------------------------------------------------------------------ from the profile alone
def batch_size_at(profile: Profile, step: int) -> int | None:
    """The micro-batch of `step`: track(batch_size=...) where given (no 'batch' marker is
    written then: the inputs did not show it), else the last 'batch' marker at or before it
    (the leading dimension of the root module's first input)."""
    given = batch_given(profile)
    if given:
        return given
    found = None
    for m in profile.markers("batch"):
        if profile.memory.size and m["position"] < profile.memory.size \
                and int(profile.memory["step"][m["position"]]) > step:
            break
        found = m["value"]
    return int(found) if found else profile.meta.get("batch_size")


def batch_given(profile: Profile) -> int | None:
    """track(batch_size=...) / `memprof run --batch-size`, where given."""
    given = (profile.run.records.get("throughput") or {}).get("batch_override")
    return int(given) if given else None


def accumulation_at(profile: Profile, step: int) -> int | None:
    """Micro-steps per optimizer step around `step`: that step's when it finished, else the
    median of the finished steps'; None when no step finished (a run that failed in its
    first optimizer step shows no accumulation). Counted as the throughput table counts
    them: a second backward() of the same pass (an auxiliary loss) is no micro-step."""
    counts = {i: n for i, n in enumerate(micro_steps(profile)) if n > 0}
    if step in counts:
        return counts[step]
    return int(np.median(list(counts.values()))) if counts else None


def _tensor_descs(inputs: dict | None):
    """The recorded input tensors' descriptions ({'shape', 'dtype', 'device'}), in order."""
    def walk(desc):
        if not isinstance(desc, dict):
            return
        if "tensor" in desc:
            yield desc["tensor"]
        for key in ("list", "tuple"):
            for d in desc.get(key, []):
                yield from walk(d)
        for d in desc.get("dict", {}).values():
            yield from walk(d)

    for d in list((inputs or {}).get("args", [])) + list((inputs or {}).get("kwargs", {})
                                                         .values()):
        yield from walk(d)


def batch_dim(inputs: dict | None, batch: int | None, given: bool = False) -> int | None:
    """The dimension of the recorded inputs that is the batch: the leading one where an
    input's is `batch`, else - for a batch size the user `given` (a (seq, batch, feature)
    layout tracked with batch_size=...) - the first of its size; None where none is (a
    marker's batch is the leading dimension: another of that size is the sequence's)."""
    shapes = [t["shape"] for t in _tensor_descs(inputs)] if batch else []
    dims = [s.index(batch) for s in shapes if batch in s] if given else []
    return 0 if any(s and s[0] == batch for s in shapes) else min(dims, default=None)


def _input_bytes(inputs: dict | None, batch: int | None, given: bool = False) -> list[int]:
    """Bytes of each recorded input tensor with the batch dimension (batch_dim): what a loop
    that makes or loads its batch allocates outside forward and backward (a DataLoader's
    collated batch, its copy to the device)."""
    dim = batch_dim(inputs, batch, given)
    out: list[int] = []
    for t in _tensor_descs(inputs) if dim is not None else ():
        dtype = getattr(torch, t.get("dtype", ""), None)
        if len(t["shape"]) > dim and t["shape"][dim] == batch and isinstance(dtype, torch.dtype):
            out.append(math.prod(t["shape"]) * dtype.itemsize)
    return [b for b in out if b > 0]


def _scalable(profile: Profile, end: int, batch: int | None = None) -> np.ndarray:
    """Memory events in [0, end) whose size scales with the batch (allocations of forward /
    backward activations and temporaries, and their frees; and, outside the passes, blocks of
    the size of a recorded batch input: the batch the loop made or loaded - left at full size,
    a DataLoader's batch alone read "even micro-batch 1 does not fit")."""
    mem = profile.memory[:end]
    alloc_of = profile.alloc_of[:end]
    owner = np.where(mem["size"] > 0, np.arange(end), alloc_of)
    ok = owner >= 0
    owner = np.where(ok, owner, 0)
    phase = profile.memory["phase"][owner]
    cat = profile.category[owner]
    # (a recomputed weight's gradient: weight-sized at any batch)
    whole = np.zeros(profile.memory.size, dtype=bool)
    whole[weight_gradients(profile)] = True
    out = ok & np.isin(phase, (PHASE_FORWARD, PHASE_BACKWARD)) \
        & np.isin(cat, (CAT_ACTIVATIONS, CAT_TEMPORARIES)) & ~whole[owner]
    sizes = _input_bytes(profile.run.records.get("inputs"), batch,
                         batch is not None and batch == batch_given(profile))
    if sizes:
        size = profile.memory["size"][owner]
        # (a CUDA block is the request rounded up to 512 bytes)
        is_input = np.zeros(end, dtype=bool)
        for b in set(sizes):
            is_input |= (size >= b) & (size < b + 512)
        # made in the run (not a block from before it: a weight of the input's size), of no
        # category that stays (parameters, gradients, optimizer state, buffers)
        made = profile.memory["thread"][owner] >= 0
        out |= ok & made & (phase == PHASE_OTHER) & is_input & \
            np.isin(cat, (CAT_OTHER, CAT_TEMPORARIES, CAT_ACTIVATIONS))
    return out


def scaled_stream(profile: Profile, step, factor: float, accumulate: bool):
    """(ptr, size) of the run up to the end of `step` with batch-dependent sizes x factor,
    the failing request of an out-of-memory report put back at its place (scaled too when it
    came from forward or backward); accumulate: that step's gradients allocated at its start
    (micro-steps 2..A)."""
    ptr, size = step_stream(profile, "first")
    end = step.end
    ptr, size = ptr[:end], size[:end].copy()
    scal = _scalable(profile, end, batch_size_at(profile, step.index))
    allocs = scal & (size > 0)
    size[allocs] = np.maximum(1, np.rint(size[allocs] * factor)).astype(np.int64)
    frees = np.flatnonzero(scal & (size < 0))
    size[frees] = -size[profile.alloc_of[frees]]
    in_step = np.arange(end) >= step.start
    grads = in_step & (size > 0) & (profile.category[:end] == CAT_GRADIENTS)
    oom = profile.oom_events[0] if profile.oom_events else None
    if oom is not None and oom["position"] <= end and not oom.get("dropped_before"):
        at, request = oom["position"], oom["requested"]
        if oom["phase"] in ("forward", "backward"):
            request = max(1, round(request * factor))
        ptr = np.insert(ptr, at, np.uint64(profile.memory.size + 1))
        size = np.insert(size, at, np.int64(request))
        in_step, grads = np.insert(in_step, at, at >= step.start), np.insert(grads, at, False)
    if accumulate:
        idx = np.arange(size.size)
        order = np.concatenate([idx[~in_step], idx[grads], idx[in_step & ~grads]])
        ptr, size = ptr[order], size[order]
    return ptr, size


def scaled_fit(profile: Profile, capacity: int, step_index: int) -> dict:
    """The largest micro-batch at which the run's scaled replay fits `capacity` (see the
    module docstring), with the accumulation that keeps the effective batch of `step_index`
    (its micro-batch x the micro-steps the run already accumulated over). The replay covers
    the whole run (also the steps after a failing first one: the steady state, optimizer
    state alive, is often the larger)."""
    if not profile.steps:
        return {"method": SCALED, "fits": False, "text": "no step recorded"}
    step = profile.steps[-1]
    batch = batch_size_at(profile, step_index)
    seen = accumulation_at(profile, step_index)
    accumulated = seen or 1
    effective = batch * accumulated if batch else None
    kept = sum(v for k, v in profile.breakdown("category", at=("position", step.end - 1))
               .items() if k in ("parameters", "gradients", "optimizer_state"))
    recomputed = _recomputed_peak(profile, step)
    fixed = kept + recomputed
    out = {"method": SCALED, "batch": batch, "accumulation_seen": seen,
           "effective_batch": effective, "fixed_bytes": int(fixed),
           "recomputed_bytes": recomputed, "estimated": True}
    # smaller micro-batches that keep the effective batch (divisors), largest first
    candidates = [d for d in range(batch - 1, 0, -1) if effective % d == 0] if batch \
        else [0.5, 0.25, 0.125, 0.0625]

    def replay(m) -> tuple[bool, int]:
        factor = m / batch if batch else m
        r = simulate(scaled_stream(profile, step, factor, accumulate=True), capacity=capacity,
                     return_timeline=False)
        return not r.oom, r.peak_reserved

    best = _largest_fitting(list(candidates), replay)
    if best is None:
        smallest = "micro-batch 1" if batch else "1/16 of the micro-batch"
        out.update(fits=False, text=(
            "the micro-batch is already 1" if batch == 1 else
            f"no smaller micro-batch fits: even {smallest} does not fit "
            f"{fmt_bytes(capacity)}") + f" (parameters, gradients and optimizer state: "
            f"{fmt_bytes(kept)}" + (f"; weights recomputed from parameters (weight_norm, "
            f"parametrizations) and their gradients: up to {fmt_bytes(recomputed)}, at any "
            "batch" if recomputed else "") + "; checkpointing, a lower precision or sharding "
            "must shrink the rest)")
        return out
    m, peak = best
    if batch:
        acc = math.ceil(effective / m)
        was = (f"; the run: {batch} x {seen}" if seen and seen > 1 else
               "" if seen else "; the run's accumulation was not seen (no step finished): "
               "multiply by it")
        out.update(fits=True, micro_batch=m, accumulation=acc, peak_reserved=peak,
                   text=f"micro-batch {m} x {acc} accumulation steps (effective batch "
                        f"{m * acc}{was}) fits: {fmt_bytes(peak)} reserved of "
                        f"{fmt_bytes(capacity)}")
    else:
        out.update(fits=True, fraction=m, peak_reserved=peak,
                   text=f"{m:g} of the recorded micro-batch (batch size not recorded) with "
                        f"{round(accumulated / m)} accumulation steps fits: "
                        f"{fmt_bytes(peak)} reserved")
    return out


def _recomputed_peak(profile: Profile, step) -> int:
    """The most bytes of recomputed weights (weight_norm, parametrizations) and of their
    gradients alive at once in `step`: memory no micro-batch shrinks."""
    whole = (profile.category == CAT_RECOMPUTED_WEIGHTS) & (profile.effective_size > 0)
    whole[weight_gradients(profile)] = True
    if not whole.any():
        return 0
    size = profile.effective_size
    owner = np.where(size > 0, np.arange(size.size), profile.alloc_of)
    ours = (owner >= 0) & whole[np.maximum(owner, 0)]
    live = np.cumsum(np.where(ours, size, 0))
    return int(live[step.start:step.end].max()) if step.end > step.start else 0


def _largest_fitting(candidates: list, replay) -> tuple | None:
    """The first candidate (largest first) whose replay fits, by bisection (fitting is
    monotone in the micro-batch) -> (candidate, peak reserved) or None."""
    seen = {}

    def fits(c) -> bool:
        seen[c] = replay(c)
        return seen[c][0]

    i = bisect.bisect_left(candidates, True, key=fits)
    if i == len(candidates):
        return None
    c = candidates[i]
    return c, (seen[c] if c in seen else replay(c))[1]


# ------------------------------------------------------------------ with the model at hand
def _dtype(name: str) -> torch.dtype:
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"recorded input dtype {name!r} is not a torch dtype")
    return d


def _build(desc: dict, batch: int, new_batch: int, dim: int | None):
    if "tensor" in desc:
        t = desc["tensor"]
        shape = list(t["shape"])
        if dim is not None and len(shape) > dim and shape[dim] == batch:
            shape[dim] = new_batch
        return torch.zeros(shape, dtype=_dtype(t["dtype"]), device=t["device"])
    if "value" in desc:
        return desc["value"]
    if "list" in desc or "tuple" in desc:
        items = [_build(d, batch, new_batch, dim)
                 for d in desc.get("list", desc.get("tuple", []))]
        return items if "list" in desc else tuple(items)
    if "dict" in desc:
        return {k: _build(d, batch, new_batch, dim) for k, d in desc["dict"].items()}
    raise ValueError(f"the model was called with a {desc.get('object')} object: a batch "
                     "cannot be rebuilt from the record")


def batch_function(model: torch.nn.Module, inputs: dict, batch: int, given: bool = False):
    """make_batch(micro_batch) -> (inputs, None) of the recorded structure; positional and
    keyword arguments are bound by the forward's signature into keywords; the batch
    dimension is batch_dim's (`given`: the batch size was given by the user)."""
    dim = batch_dim(inputs, batch, given)

    def make_batch(m):
        args = [_build(d, batch, m, dim) for d in inputs["args"]]
        kwargs = {k: _build(d, batch, m, dim) for k, d in inputs["kwargs"].items()}
        if not kwargs:
            return tuple(args), None
        sig = inspect.signature(model.forward)
        out = {}
        for name, value in sig.bind(*args, **kwargs).arguments.items():
            kind = sig.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:   # forward(**kwargs): PEFT's, wrappers'
                out.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise ValueError("the model was called with positional arguments its "
                                     "forward takes as *args beside keywords: a batch cannot "
                                     "be rebuilt from the record")
            else:
                out[name] = value
        return out, None

    make_batch(1)   # raises now for an input that cannot be rebuilt
    make_batch.batch_dim = dim or 0
    return make_batch


def precision_of(inputs: dict) -> str:
    """The precision the recorded step ran in, from the autocast state at its forward."""
    dtype = next(iter((inputs or {}).get("autocast", {}).values()), None)
    return {"float16": "fp16", "bfloat16": "bf16"}.get(dtype, "fp32")


def optimizer_factory(optimizer):
    """params -> an optimizer of the run's class and defaults; 'none' without one."""
    if optimizer is None:
        return "none"
    cls, defaults = type(optimizer), dict(optimizer.defaults)
    try:   # defaults can hold keys the constructor does not take (AdamW: decoupled_...)
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            defaults = {k: v for k, v in defaults.items() if k in params}
    except (TypeError, ValueError):
        pass

    def factory(params):
        return cls(params, **defaults)
    factory.__name__ = cls.__name__
    return factory


def _budget_gpu(budget, capacity: int):
    """(GPU for recommend, overhead, margin): a table GPU with its usual usable bytes, or a
    generic one whose usable bytes are exactly `capacity`."""
    from .gpus import GPU, generic, lookup
    if isinstance(budget, (str, GPU)):
        return lookup(budget), None, None
    return generic(capacity, name=f"{fmt_bytes(capacity)} budget"), 0, 0.0


def _precisions(model, inputs: dict, gpu) -> tuple[str, list[str], str | None]:
    """(the run's precision, the precisions to estimate - least change first -, why the run's
    own is not among them or None). A model with half-precision weights computes in them."""
    mp = model_precision(model)
    current = mp.weights if mp.half else precision_of(inputs)
    if gpu.supports(current):
        low = "bf16" if gpu.supports("bf16") else "fp16"
        return current, [current] + ([low] if current == "fp32" else []), None
    instead = sorted(default_precisions(mp, gpu), key=lambda p: p != "fp16")  # 2 bytes first
    source = "its weights are" if mp.half else "autocast in"
    how = {"fp16": "fp16 (its weights converted: the same bytes)" if mp.half else
           f"fp16 (autocast with GradScaler: about the bytes of {current})"}
    return current, instead, (
        f"the run computes in {current} ({source} {current}), and {unsupported(gpu, current)}: "
        f"there it trains in {' or '.join(how.get(p, p) for p in instead)} instead, as "
        "estimated here")


def _suggestions(plan, batch: int, order: list[tuple[str, str]],
                 effective: int | None = None) -> list[dict]:
    """Per precision x policy, least change first: the recorded micro-batch `batch` if it fits
    (with the accumulation that makes the effective batch), else the largest micro-batch
    dividing the effective batch whose prediction fits."""
    effective = effective or batch
    out = []
    for prec, pol in order:
        c = next((c for c in plan.combinations if (c.precision, c.checkpointing) == (prec, pol)),
                 None)
        if c is None or c.model is None:
            out.append({"precision": prec, "checkpointing": pol, "fits": False,
                        "text": (c.error or c.skipped) if c else "not estimated"})
            continue
        opt = plan.predict(batch, prec, pol, accumulation=effective // batch)
        for d in (d for d in range(batch - 1, 0, -1) if effective % d == 0 and not opt.fits):
            opt = plan.predict(d, prec, pol, accumulation=effective // d)
        if not opt.fits:
            out.append({"precision": prec, "checkpointing": pol, "fits": False,
                        "text": f"nothing fits: micro-batch 1 needs "
                                f"{fmt_bytes(opt.peak_reserved)} reserved"})
            continue
        out.append(dict(opt.as_dict(), text=(
            f"{prec}, checkpointing {pol}: micro-batch {opt.micro_batch} x "
            f"{opt.accumulation} accumulation, {fmt_bytes(opt.peak_reserved)} reserved, "
            f"headroom {fmt_bytes(opt.headroom)}")))
    return out


def re_estimate(model: torch.nn.Module, inputs: dict, optimizer, budget, capacity: int,
                batch: int, accumulation: int = 1, given: bool = False) -> dict:
    """What fits `budget` (a GPU name or bytes; `capacity` its usable bytes) for this model's
    step at micro-batch `batch` (`given` by the user) x `accumulation` (the effective batch
    kept), re-estimated
    (see the module docstring)."""
    model = getattr(model, "module", model) if _is_data_parallel(model) else model
    effective = batch * accumulation
    from .checkpoint import policies_for
    from .search import recommend
    t0 = time.perf_counter()
    make_batch = batch_function(model, inputs, batch, given)
    gpu, overhead, margin = _budget_gpu(budget, capacity)
    current, precisions, instead = _precisions(model, inputs, gpu)
    policies = policies_for(model, ("none", "every"))
    # (accelerate's autocast wrapper is left out of the copies: memprof.plan.amp_wrapper)
    plan = recommend(model=model, batch=make_batch, optimizer=optimizer_factory(optimizer),
                     gpu=gpu, effective_batch=effective, precisions=precisions,
                     policies=policies, overhead=overhead, margin=margin, confirm=True)
    order = [(p, c) for p in precisions for c in policies]
    # the run as recorded; in a precision the GPU cannot run, in the first that stands for it
    now = plan.predict(batch, precisions[0] if instead else current, "none",
                       accumulation=accumulation)
    said = (f"the recorded configuration ({current}, micro-batch {batch}"
            f"{f' x {accumulation} accumulation' if accumulation > 1 else ''}, no "
            "checkpointing)")
    if instead:
        said += f" cannot run there; in {precisions[0]} it"
    opt_name = type(optimizer).__name__ + " with the run's defaults" if optimizer is not None \
        else "none seen: no optimizer state estimated"
    return {"method": ESTIMATED, "batch": effective, "micro_batch": batch,
            "accumulation": accumulation, "capacity": plan.usable_bytes,
            "gpu": gpu.name, "precision": current, "estimated": True,
            "current": dict(now.as_dict(), text=(
                f"{said} needs {fmt_bytes(now.peak_reserved)} reserved of "
                f"{fmt_bytes(plan.usable_bytes)}")),
            "options": _suggestions(plan, batch, order, effective),
            # what to know: the run's precision not on this GPU, converted weights, fp16
            # overflow (memprof.plan.precision)
            "notes": ([instead] if instead else []) + list(dict.fromkeys(
                n for p in precisions for n in notes(plan.model_precision, p, gpu))),
            "assumptions": ["loss: the mean of the model's output (the run's targets are not "
                            "seen)", f"optimizer: {opt_name}",
                            "the recorded step used no activation checkpointing",
                            "steady state: optimizer state (and with accumulation the "
                            "gradients) exist from the start of the step",
                            _workspace_note(gpu)],
            "estimates": plan.estimates, "wall_s": time.perf_counter() - t0}


def _is_data_parallel(model) -> bool:
    """DDP / DataParallel: the model they wrap is what is estimated (a wrapper holds its
    process group, which cannot be copied onto fake tensors)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    return isinstance(model, (DataParallel, DistributedDataParallel))


def _workspace_note(gpu) -> str:
    """What every estimate holds that the recorded run did not: the GPU's cuBLAS workspaces
    (a small budget reads "micro-batch 1 needs 24 MiB" against a 3 MiB recorded run)."""
    from .cuda_kernels import cublas_workspace_bytes, target_for
    n = 2 * cublas_workspace_bytes(target_for(gpu))
    return (f"on the GPU every estimate holds {fmt_bytes(n)} of cuBLAS workspaces (one per "
            "thread that runs matrix products: the forward's and autograd's) and the caching "
            "allocator's rounding, which a CPU run does not have")


def what_fits(profile: Profile, budget, capacity: int, label: str, step: int, *,
              model: torch.nn.Module | None = None, optimizer=None,
              scaled: bool = True) -> dict:
    """What would fit `capacity` instead of `step`: scaled from the profile, and re-estimated
    when the model is given (see the module docstring). scaled=False: the step fits, but in
    a precision the GPU cannot run; only the re-estimate (in those it can) says what would.
    Never raises: a failed re-estimate is a note."""
    out = {"for": label, "capacity": int(capacity), "step": int(step), "estimated": True,
           "scaled": scaled_fit(profile, capacity, step) if scaled else None,
           "estimate": None, "note": None}
    inputs = profile.run.records.get("inputs")
    batch = batch_size_at(profile, step)
    if model is None:
        out["note"] = ("checkpointing and precision need the model: memprof.track(model, "
                       "budget=...) re-estimates them")
    elif not inputs or not batch:
        out["note"] = "the model's inputs were not recorded: not re-estimated"
    else:
        try:
            out["estimate"] = re_estimate(model, inputs, optimizer, budget, capacity, batch,
                                          accumulation_at(profile, step) or 1,
                                          given=batch == batch_given(profile))
        except Exception as err:  # noqa: BLE001  (advice must not hide the diagnosis)
            out["note"] = (f"re-estimating failed: {type(err).__name__}: "
                           f"{str(err).splitlines()[0][:200] if str(err) else ''}")
    return out
