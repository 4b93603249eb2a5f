"""Distributed runs: which rank this process is, and what its collectives cost and hold.

A `torchrun` job runs one process per rank; each records itself. This module gives
- `identity()`: rank, world size, local rank and backend (torch.distributed's default group
  when it is initialised, else torchrun's RANK / WORLD_SIZE / LOCAL_RANK), plus torchrun's run
  id, so the files of one job can be merged (memprof.analyse.ranks);
- `rank_path()`: `x.memprof` -> `x.rank3.memprof`, one file per rank;
- `CommRecorder`: wraps torch.distributed's collectives (through the session's patch
  registry) to time each call from launch to completion - an async call ends when its Work's
  future completes, not when it returns - and names the tensors handed to them as
  "communication" memory (a snapshot): DDP's gradient buckets (DDP's own allreduce is issued
  from C++, so a DDP model without a comm hook gets torch's `allreduce_hook`, documented to
  give the same result, at its first forward) and FSDP2's all-gather and reduce-scatter
  buffers, plus the unsharded parameters FSDP2 gathers for each layer.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time

import torch

from .events import CAT_COMMUNICATION
from .snapshots import storage_key

# torch.distributed functions that move tensors between ranks (those present are wrapped)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
               "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
               "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter",
               "barrier", "all_reduce_coalesced", "all_gather_coalesced")
_RANK_SUFFIX = re.compile(r"\.rank\d+$")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def identity() -> dict | None:
    """This process's place in a distributed job (rank, world_size, local_rank,
    dist_backend, and `run_id` under torchrun);
    None when neither torch.distributed nor torchrun's environment says it is in one."""
    out = None
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        out = {"rank": dist.get_rank(), "world_size": dist.get_world_size(),
               "local_rank": _env_int("LOCAL_RANK"), "dist_backend": str(dist.get_backend())}
    elif _env_int("RANK") is not None and _env_int("WORLD_SIZE") is not None:
        out = {"rank": _env_int("RANK"), "world_size": _env_int("WORLD_SIZE"),
               "local_rank": _env_int("LOCAL_RANK"), "dist_backend": None}
    if out is not None and os.environ.get("TORCHELASTIC_RUN_ID"):
        out["run_id"] = os.environ["TORCHELASTIC_RUN_ID"]
    return out


def rank_path(path: str, rank: int) -> str:
    """`run.memprof` -> `run.rank<R>.memprof` (a path already naming rank R is kept)."""
    stem, ext = os.path.splitext(path)
    if not ext:
        stem, ext = path, ".memprof"
    if stem.endswith(f".rank{rank}"):
        return path
    return f"{_RANK_SUFFIX.sub('', stem)}.rank{rank}{ext}"


def _delegating_allreduce_hook():
    """(hook, slot): a DDP comm hook that is torch's allreduce_hook - its all_reduce goes
    through torch.distributed's Python function, where it is timed - or, once `slot[0]` holds
    (state, hook), that hook (the user's, registered after memprof's)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    slot: list = [None]

    def memprof_allreduce_hook(state, bucket):
        user = slot[0]
        if user is not None:
            return user[1](user[0], bucket)
        return allreduce_hook(state, bucket)
    return memprof_allreduce_hook, slot


def _tensors(args, kwargs) -> list[torch.Tensor]:
    """Tensors among a collective's arguments (lists flattened: all_gather takes a list,
    all_gather_coalesced a list of lists)."""
    out = []
    for v in list(args) + list(kwargs.values()):
        out += _flat(v)
    return out


def _flat(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat(v)]
    return []


def collective_bytes(args, kwargs) -> int:
    """The bytes of a collective call: its largest argument, a list of tensors counting as
    all of them. So the whole buffer, whichever form the call takes: an all-gather's output
    (every rank's chunk: all_gather's list, all_gather_single's tensor), a reduce-scatter's
    input, an all-reduce's or broadcast's tensor. The largest single tensor counted one
    chunk of the list forms (FSDP1's all_gather: half of FSDP2's all_gather_single for the
    same data on 2 ranks)."""
    sizes = [sum(t.numel() * t.element_size() for t in _flat(v))
             for v in list(args) + list(kwargs.values())]
    return int(max(sizes, default=0))


class CommRecorder:
    """Collective calls with their wall time and bytes, and the rank identity of the run."""
    name = "communication"

    def __init__(self):
        self.session = None
        self.calls: list[list] = []     # [op, t_start_ns, t_end_ns or None, bytes, async]
        self.identity: dict | None = None
        self.notes: list[str] = []
        self.ddp_hooked = 0
        self._lock = threading.Lock()
        self._seen_ddp: set[int] = set()
        self._ddp_hooks: dict[int, list] = {}   # id(ddp) -> our hook's slot for the user's
        self._fsdp_checked = False
        # .inside: this thread is inside a recorded collective (see _wrap)
        self._thread = threading.local()

    # ------------------------------------------------------------------ install / remove
    def install(self, session) -> None:
        self.session = session
        self.identity = identity()
        dist = torch.distributed
        if not dist.is_available():
            return
        from torch.distributed import distributed_c10d as c10d
        for name in COLLECTIVES:
            fn = getattr(c10d, name, None)
            if fn is None:
                continue
            for owner in (dist, c10d):   # callers use either module's attribute
                if getattr(owner, name, None) is fn:
                    session.patches.patch(owner, name, lambda orig, n=name: self._wrap(n, orig))
        for owner in (dist, c10d):
            if getattr(owner, "destroy_process_group", None) is c10d.destroy_process_group:
                session.patches.patch(owner, "destroy_process_group", self._wrap_destroy)
        from torch.nn.parallel import DistributedDataParallel
        session.patches.patch(DistributedDataParallel, "forward", self._wrap_ddp_forward)
        session.patches.patch(DistributedDataParallel, "register_comm_hook",
                              self._wrap_register_comm_hook)

    def _patch_fsdp(self) -> None:
        """On the first collective, once: FSDP2's unshard wait, if FSDP2 is in use (imported:
        importing it here would cost seconds to every run that does not use it)."""
        self._fsdp_checked = True
        group_module = sys.modules.get("torch.distributed.fsdp._fully_shard._fsdp_param_group")
        group = getattr(group_module, "FSDPParamGroup", None)
        if group is not None and hasattr(group, "wait_for_unshard"):
            self.session.patches.patch(group, "wait_for_unshard", self._wrap_unshard)

    def remove(self) -> None:
        self._note_identity()
        self.session = None     # wrappers still referenced somewhere pass straight through

    def _note_identity(self) -> None:
        found = identity()
        if found is not None and (self.identity is None
                                  or self.identity.get("dist_backend") is None):
            self.identity = found

    # ------------------------------------------------------------------ wrappers
    def _wrap(self, op: str, original):
        """The collective, timed and recorded once per call of the script's: a collective
        it calls in turn is part of it (all_gather_into_tensor calls all_gather_single through
        the module's globals, both wrapped), and so is the same call handed back to memprof's
        wrapper by a torch function mode (torch's collectives defer to one; the update watch's
        calls the function it is handed, the wrapper)."""
        recorder = self
        local = self._thread

        def collective(*args, **kwargs):
            if recorder.session is None or getattr(local, "inside", False):
                return original(*args, **kwargs)
            local.inside = True
            try:
                return recorder._recorded(op, original, args, kwargs)
            finally:
                local.inside = False
        collective.__wrapped__ = original
        return collective

    def _recorded(self, op: str, original, args, kwargs):
        """original(*args, **kwargs), noted as one call: [op, start, end, bytes, async]."""
        if not self._fsdp_checked:
            self._patch_fsdp()
        self._label([(t, t) for t in _tensors(args, kwargs)])
        nbytes = collective_bytes(args, kwargs)
        start = time.monotonic_ns()    # the native event clock (steady_clock)
        result = original(*args, **kwargs)
        row = [op, start, None, nbytes, False]
        if hasattr(result, "get_future"):   # async_op=True: ends when the work completes
            row[4] = True
            self._end_on_completion(result, row)
        else:
            row[2] = time.monotonic_ns()
        with self._lock:
            self.calls.append(row)
        return result

    def _end_on_completion(self, work, row: list) -> None:
        def done(_future):
            row[2] = time.monotonic_ns()
        try:
            work.get_future().add_done_callback(done)
        except Exception:  # noqa: BLE001  (a backend without futures: time to return only)
            row[2] = time.monotonic_ns()

    def _label(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Name the storages of (tensor, its parameter or itself) pairs as communication
        memory (a later snapshot - gradients, parameters - takes precedence for the same
        storage); the parameter, when it is one of the model's, names the module."""
        pairs = [(t, p) for t, p in pairs if storage_key(t) is not None]
        if pairs:
            self.session.snapshots.take(CAT_COMMUNICATION, pairs)

    def _wrap_destroy(self, original):
        recorder = self

        def destroy_process_group(*args, **kwargs):
            recorder._note_identity()   # the rank is gone once the group is
            return original(*args, **kwargs)
        return destroy_process_group

    def _wrap_ddp_forward(self, original):
        recorder = self

        def forward(ddp, *args, **kwargs):
            if recorder.session is not None and id(ddp) not in recorder._seen_ddp:
                recorder._seen_ddp.add(id(ddp))
                recorder._note_identity()
                recorder._hook_ddp(ddp)
            return original(ddp, *args, **kwargs)
        return forward

    def _hook_ddp(self, ddp) -> None:
        """DDP issues its bucket allreduce from C++; torch's Python `allreduce_hook` (same
        result by torch's documentation) issues it through dist.all_reduce, where it is timed
        and its bucket named. A model with its own comm hook is left as it is."""
        if getattr(ddp, "_comm_hooks", None):
            self.notes.append("DDP has its own comm hook: its calls are timed where they go "
                              "through torch.distributed's Python functions")
            return
        hook, slot = _delegating_allreduce_hook()
        try:
            ddp.register_comm_hook(ddp.process_group, hook)
        except RuntimeError as err:   # a built-in hook registered before
            self.notes.append(f"DDP comm hook not registered: {str(err).splitlines()[0]}")
            return
        self._ddp_hooks[id(ddp)] = slot
        self.ddp_hooked += 1

    def _wrap_register_comm_hook(self, original):
        """DDP takes one comm hook: the user's, registered after memprof's (a sanity forward
        before `register_comm_hook(state, fp16_compress_hook)`), failed with "can only be
        called once". Within the block it becomes what memprof's hook calls instead of
        torch's allreduce_hook - registered as DDP notes it."""
        recorder = self

        def register_comm_hook(ddp, state, hook):
            slot = recorder._ddp_hooks.get(id(ddp))
            if slot is None or slot[0] is not None:
                return original(ddp, state, hook)
            ddp._check_comm_hook(hook)
            slot[0] = (state, hook)
            ddp._comm_hooks.append((hook, state))
            if ddp.logger is not None:
                ddp.logger._set_comm_hook_name(getattr(hook, "__qualname__", repr(hook)))
            return None
        return register_comm_hook

    def _wrap_unshard(self, original):
        recorder = self

        def wait_for_unshard(group, *args, **kwargs):
            result = original(group, *args, **kwargs)
            if recorder.session is not None:   # gathered: (unsharded, the module's shard)
                pairs = []
                for fp in getattr(group, "fsdp_params", ()):
                    p = getattr(fp, "_unsharded_param", None)
                    if isinstance(p, torch.Tensor):
                        pairs.append((p, getattr(fp, "sharded_param", p)))
                recorder._label(pairs)
            return result
        return wait_for_unshard

    def record(self) -> dict:
        """Plain data: the calls ([op, t_start_ns, t_end_ns, bytes, async]; t_end None when
        an async call had not completed by the end of the block)."""
        self._note_identity()
        with self._lock:
            calls = [list(c) for c in self.calls]
        return {"identity": self.identity, "calls": calls, "ddp_hooks_registered":
                self.ddp_hooked, "notes": list(self.notes)}
