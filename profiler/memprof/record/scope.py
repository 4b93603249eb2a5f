"""Which module is running (native scope stack), and when a forward pass of the root module
starts and ends (for a container that is never called, a GAN's `ModuleDict`, the passes are
its models' calls, a compiled one's too). With a model, every call of its modules goes
through `Module.__call__`, replaced on the class for the block (module_call.py): a
submodule's runs in its scope, the model's own is a pass; no hook is set on any module.

Every recorder that cares about forward passes subscribes here instead of installing hooks of
its own: `on_forward_start(args, kwargs)` and `on_forward_end()` run once per real forward
pass (not for the recomputation that activation checkpointing runs in backward); `pass_module`
is the module whose call it is.
With a model, its modules are named up front; without one (auto mode, what `memprof run`
uses) module_call hands every call here and whatever modules run are named, the outermost one
called being a root;
a root called inside a model seen later (`model.encoder(x)` before `model(x)`) takes the path
it has in that model (`encoder.layers.3`, not `layers.3`).

Under torch.compile the call steps aside while dynamo traces (it calls into memprof._C,
which would break the graph at every module): allocations inside compiled code
belong to the module that called it (the compiled module, eagerly entered, or the root), a
coarser attribution the report names (`compiled`).
"""
from __future__ import annotations

import functools
import sys
import threading
import weakref

import torch

from .. import _C
from . import module_call
from .beside_names import BesideNaming
from .module_call import compiling as _compiling
from .module_call import dynamo_compiling as _dynamo_compiling
from .module_call import export_flag as _export
from .pass_thread import PassThread
from .recomputed_weights import ParametrizationOwners
from .root_names import COMPILE_WRAPPER, RootNaming, clean_name

def _pass_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose calls are forward passes of the model: the model itself or, for a
    container that is never called (`ModuleDict({"G": G, "D": D})` for a GAN, a
    ModuleList), the callable modules it holds (a GAN tracked that way had no forward pass,
    batch or activations at all)."""
    try:
        forward = type(model).forward
    except AttributeError:   # a ScriptModule's: a pass (torch says what it refuses)
        return [model]
    if forward is not torch.nn.Module.forward or "forward" in vars(model):
        return [model]   # (torch.compile's wrapper sets its forward on the instance)
    return [m for child in model.children() for m in _pass_modules(child)]


def _is_compiled(module: torch.nn.Module) -> bool:
    """torch.compile's wrapper, or a module compiled in place (`module.compile()`)."""
    return type(module).__name__ == "OptimizedModule" or \
        getattr(module, "_compiled_call_impl", None) is not None


def _skipping_module_call(original):
    """torch.compile for the block: dynamo, loaded by the first call with torch's own
    Module.__call__ in place (module_call.load_dynamo), skips module_call's frame (see
    module_call.skip_own_frame)."""
    def compile(*args, **kwargs):
        module_call.load_dynamo()
        result = original(*args, **kwargs)
        module_call.skip_own_frame()
        return result
    return compile


class ModuleScope(RootNaming, BesideNaming):
    def __init__(self, model: torch.nn.Module | None, auto: bool, steps):
        self.model = model
        self.auto = auto and model is None
        self._steps = steps                       # the StepClock: markers carry its step
        self.names: list[str] = []                # module id -> qualified name
        self.param_module: dict[int, int] = {}    # id(parameter) -> module id
        self._roots: list = []                    # auto mode: RootSlot per root named, in order
        self._root_prefixes: dict[int, str] = {}  # auto mode: id(side root) -> its prefix
        self._first_root_name: str | None = None   # auto mode: what the code calls roots[0]
        # what was named beside the models called (beside_names.py): id(model) -> prefix,
        # id(module) -> its id, a list of tensors' path -> its id; the prefixes given
        self._beside_prefixes: dict[int, str] = {}
        self._beside_labels: set[str] = set()
        self._beside_ids: dict[int, int] = {}
        self._kept_ids: dict[str, int] = {}
        self.before_forward: list = []            # fn(), before a real root forward starts
        self.on_forward_start: list = []          # fn(args, kwargs), at a real pass's start
        self.on_forward_end: list = []
        self._auto_ids: dict[int, int] = {}
        self._called_ids: dict[str, int] = {}     # auto mode: `parent.<Class>` -> its id
        self._refs: dict[tuple[int, int], weakref.ref] = {}   # see _forget_when_freed
        # torch's ParametrizationLists, noted as named (they may be freed before the end)
        self.parametrizations = ParametrizationOwners(self._forget_when_freed)
        self._stack: list[int] = []               # auto mode: running module ids
        self._passes = PassThread()               # the thread whose calls are passes
        # auto mode: new modules named by one thread at a time (a model trained on a thread
        # of its own is named there, while the passes' thread may name its own)
        self._naming_lock = threading.RLock()
        # auto mode: models first called on such a thread (side roots), held weakly: id ->
        # weak reference; the prefixes they were given; modules refused as side roots
        self._side: dict[int, weakref.ref] = {}
        self._side_prefixes: set[str] = set()
        self._side_named = 0
        self._not_side: dict[int, bool] = {}
        self._root_depth = 0                      # passes running (calls or forward_pass)
        # a model whose own forward the loop never calls (a LightningModule tracked itself:
        # its training_step calls self.net(x)): its callable children stand in for it, their
        # outermost calls the passes, until the model itself is called (then none is left)
        self._stand_ins: set[int] = set()
        # whether the pass starting has the model's own call arguments (not those of
        # Lightning's training_step(batch, batch_idx)): what the inputs record may describe
        self.module_call = True
        self._forward_depth = None                # the depth whose call began the real pass
        self.pass_module = None                   # the module whose call the real pass is (in it)
        self._compiled_seen = False               # compiled code ran (see `compiled`)
        self._patches = None                      # the session's (torch.compile's entries)
        self._module_ids: tuple = (None, [])      # (names, roots) count -> module_refs()
        self._on_module_call = False              # module_call installed by this scope
        self._call_ids: dict[int, int] = {}       # id(module) -> module id or PASS (module_call)
        self._pass_ids: dict[int, int] = {}       # id(pass module) -> its module id
        # memprof's own methods set on a module instance while tracking (an integration's
        # training_step as a forward pass): id(module) -> {name: method}, left out of copies
        self.instance_methods: dict[int, dict[str, object]] = {}
        self._getstate_wrapped: set[type] = set()   # classes whose __getstate__ is wrapped
        if model is not None:
            self._name_tree(model, "")

    @property
    def compiled(self) -> bool:
        """Whether a module of the block ran inside what torch.compile (or non-strict export)
        traced: its memory is attributed to the compiled module as a whole."""
        return self._compiled_seen or (self._on_module_call and module_call.traced)

    # ------------------------------------------------------------------ naming
    def _name_tree(self, root: torch.nn.Module, prefix: str, rename=frozenset()) -> None:
        """Ids and qualified names for a root's modules; modules already named keep their id
        and, if in `rename` (ids of modules under an earlier root now inside this one), take
        their path in this tree."""
        by_name: dict[str, int] = {}
        for name, sub in root.named_modules(remove_duplicate=True):
            full = clean_name(".".join(x for x in (prefix, name) if x))
            mid = self._auto_ids.get(id(sub))
            if mid is None and id(sub) in self._beside_ids:   # named beside, now called
                mid = self._beside_ids.pop(id(sub))
                self._name(sub, mid)
                self.names[mid] = full
            if mid is not None:
                if id(sub) in rename:
                    self.names[mid] = full
                by_name.setdefault(full, mid)
                continue
            if full in by_name:          # the model inside torch.compile's wrapper: one module
                mid = by_name[full]
            else:
                mid = by_name[full] = len(self.names)
                self.names.append(full)
            self._name(sub, mid)
            for p in sub.parameters(recurse=False):
                if id(p) not in self.param_module:
                    self.param_module[id(p)] = mid
                    self._forget_when_freed(p, self.param_module)

    def _name(self, module: torch.nn.Module, mid: int) -> None:
        self._auto_ids[id(module)] = mid
        self._forget_when_freed(module, self._auto_ids)
        self.parametrizations.note(module, mid, self._auto_ids)

    def _forget_when_freed(self, obj, table: dict) -> None:
        """Drop `table[id(obj)]` when obj is freed: nothing here holds a module or a
        parameter (a replaced one is freed in the block, as untracked), and a new object
        at its address must not take its name."""
        key = id(obj)

        def forget(_ref, key=key, table=table, refs=self._refs):
            table.pop(key, None)
            refs.pop((key, id(table)), None)
        self._refs[(key, id(table))] = weakref.ref(obj, forget)

    def naming(self) -> tuple[int, int]:
        """What changes when modules are named (a new root, a new submodule): what is kept
        per set of named modules is kept under it."""
        return len(self.names), len(self._roots) + len(self._side)

    def module_refs(self) -> list[tuple[weakref.ref, int]]:
        """(weak reference to the module, id) for every named module of the model or the
        roots seen so far; walked again only when modules were named since (it runs at every
        step end). Weak: a module the user replaces or deletes inside the block (a new
        classifier head) is freed then, as without memprof (the list kept it alive, and its
        parameters allocated, until the block ended)."""
        key = self.naming()
        if self._module_ids[0] != key:
            out, seen = [], set()
            for m in self.root_modules():
                for sub in m.modules():
                    mid = self._auto_ids.get(id(sub))
                    if mid is not None and id(sub) not in seen:
                        seen.add(id(sub))
                        out.append((weakref.ref(sub), mid))
            self._module_ids = (key, out)
        return self._module_ids[1]

    def module_ids(self) -> list[tuple[torch.nn.Module, int]]:
        """(module, id) for the named modules still alive (module_refs, dereferenced)."""
        return [(m, mid) for m, mid in ((r(), mid) for r, mid in self.module_refs())
                if m is not None]

    def module_id(self, module: torch.nn.Module) -> int | None:
        """The id this scope gave `module`, if it named it."""
        return self._auto_ids.get(id(module))

    def root_modules(self) -> list[torch.nn.Module]:
        if self.model is not None:
            return [self.model]
        return self.roots + self._side_roots()

    def parameter_names(self) -> dict[int, str]:
        """id(parameter) -> qualified name, over the model or the roots seen so far."""
        out: dict[int, str] = {}
        for m in self.root_modules():
            prefix = self.root_label(m)
            for n, q in m.named_parameters(remove_duplicate=True):
                out.setdefault(id(q), f"{prefix}.{n}" if prefix else n)
        return out

    # ------------------------------------------------------------------ install / remove
    def install(self, patches) -> None:
        self._patches = patches
        self._install_calls()
        if self.model is not None or self.auto:
            self._see_compiled_calls(patches)

    def keep_out_of_copies(self, owner: torch.nn.Module, name: str, method) -> None:
        """`owner.<name>` is memprof's `method` (set on the instance) while tracking: a copy
        or a save of the module made meanwhile leaves it out (torch.save(self) inside a
        Lightning training_step could not pickle it), in auto mode too."""
        self.instance_methods.setdefault(id(owner), {})[name] = method
        if self._patches is not None:
            self._copy_without_instance_methods([owner])

    def _copy_without_instance_methods(self, modules) -> None:
        """A module copied or saved while tracked leaves memprof's instance methods behind
        (an integration's training_step): closures of this scope, which torch.save(self)
        inside a Lightning training_step could not pickle. Module's own pickled state drops
        them; a subclass's `__getstate__` that calls it does too."""
        scope = self

        def make(original):
            def __getstate__(module):
                state = original(module)
                if state is module.__dict__:   # a class returning its live dict: not that
                    state = dict(state)
                for name, method in scope.instance_methods.get(id(module), {}).items():
                    if state.get(name) is method:
                        del state[name]
                return state
            return __getstate__
        # classes that define their own __getstate__ (LightningModule) do not reach Module's:
        # theirs is wrapped too
        owners = {cls for m in modules for cls in type(m).__mro__
                  if "__getstate__" in cls.__dict__ and issubclass(cls, torch.nn.Module)}
        for cls in sorted(owners - self._getstate_wrapped,
                          key=lambda c: c is not torch.nn.Module):
            self._patches.patch(cls, "__getstate__", make)
            self._getstate_wrapped.add(cls)

    def __deepcopy__(self, memo):
        """The scope itself, where a copy still reaches it (through an instance method of a
        module whose __getstate__ memprof did not wrap): its locks made that fail."""
        return self

    def _install_calls(self) -> None:
        if self.model is not None:
            passes = {id(m) for m in _pass_modules(self.model)}
            if passes == {id(self.model)}:
                self._stand_ins = {id(m) for child in self.model.children()
                                   for m in _pass_modules(child)} - passes
                passes |= self._stand_ins
            for mod in self.model.modules():
                if id(mod) in passes:
                    # (its id as named: a compiled model's wrapper and the model are one)
                    self._pass_ids[id(mod)] = self._auto_ids[id(mod)]
                    self._call_ids[id(mod)] = module_call.PASS
                elif mod is not self.model:   # (a root that is not a pass: a container)
                    self._call_ids[id(mod)] = self._auto_ids[id(mod)]
                if id(mod) in self._call_ids:
                    self._forget_when_freed(mod, module_call.scoped_ids)
                if _is_compiled(mod):   # compiled (and run) before the block
                    self._compiled_seen = True
            module_call.install(self._call_ids, self._patches, self._pass_call)
        elif self.auto:
            module_call.install({}, self._patches, other_handler=self._auto_call)
        else:
            return
        self._on_module_call = True
        self._patches.patch(torch, "compile", _skipping_module_call)

    # ------------------------------------------------------------------ torch.compile
    # Module calls run eagerly through module_call, compiled code inside them (a model
    # compiled in place, `model.compile()`, has its pass started there). A call of the model
    # through torch.compile's wrapper (`cm = torch.compile(model)` with track(model)) runs the
    # model's call as the compiled frame: its pass is started at the wrapper's call.
    def _see_compiled_calls(self, patches) -> None:
        scope = self

        def make_compile(original):
            def compile(module, *args, **kwargs):
                result = original(module, *args, **kwargs)
                if scope.model is None or id(module) in scope._call_ids:
                    scope._compiled_seen = True
                return result
            return compile
        patches.patch(torch.nn.Module, "compile", make_compile)
        if self.model is None:
            return
        dynamo = sys.modules.get("torch._dynamo.eval_frame")   # loaded once torch.compile ran
        if dynamo is not None and hasattr(dynamo, "OptimizedModule"):
            patches.patch(dynamo.OptimizedModule, "__call__", self._wrapper_call)

    def _wrapper_call(self, original):
        """OptimizedModule.__call__ while tracking: a call of the model's wrapper is a pass of
        the model (other wrappers call through unchanged)."""
        scope = self

        def call(wrapper, *args, **kwargs):
            if getattr(wrapper, COMPILE_WRAPPER, None) is not scope.model or _compiling():
                return original(wrapper, *args, **kwargs)
            scope._compiled_seen = True
            scope._own_call()
            return scope._model_pass(functools.partial(original, wrapper), args, kwargs,
                                     own_call=True)
        module_call.never_compiled(call)
        return call

    def after_restore(self) -> None:
        """Once the session's patches are undone (see module_call.after_restore)."""
        if self._on_module_call:
            module_call.after_restore()

    def remove(self) -> None:
        if self._on_module_call:
            module_call.remove()   # (Module.__call__ itself is put back with the patches)

    # ------------------------------------------------------------------ root passes
    # Once per forward pass, with caches the step's kernels emptied: direct calls into
    # memprof._C, subscriber lists walked over a copy (a subscriber may leave when done).
    # Never while dynamo traces: module_call and _model_pass step aside before.
    def _root_pre(self, module, args, kwargs, mid: int = 0):
        self._root_depth += 1
        self._passes.started = True
        # a real pass: not a recompute in backward, not inside one already begun (Lightning's
        # training_step calling the module's own forward)
        real = self._forward_depth is None and not torch._C._current_autograd_node()
        if real:
            for fn in tuple(self.before_forward):
                fn()
            _C.forward_start(self._steps.step, mid)   # phase, marker, module: one call
            self._steps.began = True
        else:
            _C.push_module(mid)
        if real:
            self._forward_depth = self._root_depth
            self.pass_module = module
            for fn in tuple(self.on_forward_start):
                fn(args, kwargs)

    def _root_post(self, module, args, output):
        if self._forward_depth == self._root_depth:
            self._forward_depth = None
            self.pass_module = None   # (held past the pass, it was one more path from memprof
            # to the model: `memprof run` named leak holders through it)
            _C.forward_end(self._steps.step)   # module off; phase "other" and marker
            for fn in tuple(self.on_forward_end):
                fn()
        else:
            _C.pop_module()
        self._root_depth = max(0, self._root_depth - 1)

    def _pass_call(self, module, args, kwargs):
        """A call of the model (or of a container's model): a forward pass, run eagerly
        through module_call (a model compiled in place runs its compiled code inside). On
        another thread (a background evaluation) the model runs in its scope and is no pass:
        its phase and batch markers would cut into the training thread's."""
        mid = self._pass_ids.get(id(module), 0)
        if threading.get_ident() != self._passes.ident and not self._passes.takes(module, True):
            return module_call.call_in_scope(mid, module, args, kwargs)
        if id(module) in self._stand_ins:
            if self._root_depth:   # inside a pass (Lightning's training_step as one)
                return module_call.call_in_scope(mid, module, args, kwargs)
        elif module is self.model and self._stand_ins:   # (checked here: a frame a step)
            self._own_call()
        module_call.outside_dynamo(self._root_pre, module, args, kwargs, mid)
        output = None
        try:
            output = module_call.call_through(module, args, kwargs)
            return output
        finally:
            module_call.outside_dynamo(self._root_post, module, args, output)

    def _own_call(self) -> None:
        """A call of the model itself: once one runs with gradients on (an evaluation
        `model(x)` under no_grad between steps that run its children made the steps after it
        read 0 micro-steps), its children are its passes' no more."""
        if not self._stand_ins or not torch.is_grad_enabled():
            return
        # its children are scoped calls again, on module_call's inline path (a handler call
        # each was a Python frame more per call)
        for sid in self._stand_ins:
            mid = self._pass_ids.pop(sid, None)
            if mid is not None:
                self._call_ids[sid] = mid
                module_call.scoped_ids[sid] = mid
        self._stand_ins = set()

    def forward_pass(self, fn, *args, **kwargs):
        """Run fn(*args, **kwargs) as a forward pass of the model (phase, markers, batch size
        from its arguments, allocations in the root module): for loops whose training step
        is not the model's forward (Lightning's `training_step`)."""
        return self._model_pass(fn, args, kwargs, own_call=False)

    def _model_pass(self, fn, args, kwargs, own_call: bool):
        """fn(*args, **kwargs) as a pass of the model; `own_call`: these are the model's
        own call arguments (the inputs record describes only those)."""
        if self.model is None:
            return fn(*args, **kwargs)
        if _dynamo_compiling() or _export._is_compiling_flag:   # (a compiled training_step)
            self._compiled_seen = True
            return fn(*args, **kwargs)
        self.module_call = own_call
        try:
            module_call.outside_dynamo(self._root_pre, self.model, args, kwargs)
        finally:
            self.module_call = True
        try:
            return fn(*args, **kwargs)
        finally:
            module_call.outside_dynamo(self._root_post, self.model, args, None)

    # ------------------------------------------------------------------ auto mode
    def _auto_call(self, module, args, kwargs):
        """Every module call no block named (module_call's): the module is named as it runs,
        the outermost one called being a root, whose calls are passes. On another thread
        (a background evaluation, a prefetcher) a module the block named runs in its scope
        and nothing else: such a call took the thread-shared stack, became the first root
        (the model then read as a `Linear`) and counted as a pass."""
        mid = self._auto_ids.get(id(module))
        if threading.get_ident() != self._passes.ident and \
                not self._passes.takes(module, False):
            if mid is None:
                mid = module_call.outside_dynamo(self._other_thread_root, module)
            if mid is None:
                return module_call.call_through(module, args, kwargs)
            return module_call.call_in_scope(mid, module, args, kwargs)
        if mid is not None and self._stack:   # a named module inside a pass: no frame of ours
            self._stack.append(mid)
            _C.push_module(mid)
            try:
                return module_call.call_through(module, args, kwargs)
            finally:
                self._stack.pop()
                _C.pop_module()
        mid, root = module_call.outside_dynamo(self._auto_enter, module, args, kwargs, mid)
        try:
            return module_call.call_through(module, args, kwargs)
        finally:
            module_call.outside_dynamo(self._auto_leave, module, args, root)

    def _auto_enter(self, module, args, kwargs, mid):
        """(module id, whether a root) of a module call in auto mode, named if new, its scope
        entered (a root's call is a pass)."""
        if mid is None:
            with self._naming_lock:
                mid = self._name_new(module)
        elif not self._stack and id(module) in self._side:
            with self._naming_lock:
                self._promote(module)
        root = not self._stack
        self._stack.append(mid)
        if root:
            self._root_pre(module, args, kwargs, mid)
        else:
            _C.push_module(mid)
        return mid, root

    def _name_new(self, module) -> int:
        """The id of a module the passes' thread calls for the first time, named: a root when
        outermost, else under the running module (`parent.<Class>`)."""
        if id(module) in self._auto_ids:   # named by another thread meanwhile
            return self._auto_ids[id(module)]
        if not self._stack:
            self._add_root(module)
            if _is_compiled(module):   # torch.compile's wrapper (dynamo may skip __call__)
                self._compiled_seen = True
        else:
            # one id per name: a loss module a forward makes anew at every call (T5's
            # CrossEntropyLoss) took a new id and one more `<CrossEntropyLoss>` per step
            name = f"{self.names[self._stack[-1]]}.<{type(module).__name__}>".lstrip(".")
            mid = self._called_ids.get(name)
            if mid is None:
                mid = self._called_ids[name] = len(self.names)
                self.names.append(name)
            self._name(module, mid)
        return self._auto_ids[id(module)]

    def _auto_leave(self, module, args, root: bool) -> None:
        self._stack.pop()
        if root:
            self._root_post(module, args, None)
        else:
            _C.pop_module()
