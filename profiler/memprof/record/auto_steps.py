"""Steps of loops that have no optimizer: a hand-written update (`p.data.add_(p.grad,
alpha=-lr)`, as pytorch/examples' word_language_model does) is found from what every training
loop does - a backward (or a torch.autograd.grad call whose inputs are tracked parameters: a
functional loop), then a change of the parameters it made gradients for. The change is
noticed at the next forward of the root module (or when the block ends), and the step ends
there; gradients are noted (a category snapshot) after each backward, whoever consumes them.

Off as soon as steps are marked explicitly (an optimizer step of a watched optimizer, or
`prof.step()`), and when track(step_on=...) chose what ends a step; gradients are still noted
after each backward then, as long as no optimizer step notes them. Reading the parameters
costs two scalar reads per parameter per forward, only in this mode (on a GPU each read waits
for the device: a hand-written loop pays it, an optimizer loop never does).
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch._subclasses.fake_tensor import is_fake

from .. import _C
from .events import CAT_GRADIENTS
from .module_call import dynamo_compiling, outside_dynamo
from .snapshots import is_plain_tensor
from .update_watch import UpdateWatch, forget_call_sites


def fingerprint(params: list[torch.Tensor]) -> tuple[str, ...] | None:
    """First and last element of every tensor (as float.hex, so NaN equals NaN), read
    without allocating; None when the values cannot be read (fake or meta tensors)."""
    out = []
    with torch.no_grad():
        for p in params:
            if p.numel() == 0:
                continue
            if p.is_meta or (not is_plain_tensor(p) and is_fake(p)):
                return None
            t = p.detach()
            out.append(float(t[(0,) * t.dim()].item()).hex())
            out.append(float(t[(-1,) * t.dim()].item()).hex())
    return tuple(out)


class AutoSteps:
    def __init__(self, session):
        self.session = session
        # the parameters the last backward made gradients for, weakly (a module the user
        # replaces before the next forward - a new head - is freed then, as untracked)
        self._params: list[weakref.ref] = []
        self._before: list | None = None      # their fingerprints then, one per parameter
        self.update = UpdateWatch(session.steps)   # where the hand-written update runs
        self.closed = False                         # the block has ended

    def install(self) -> None:
        self.session.backward.after.append(self._after_backward)
        steps = self.session.steps
        if steps.optimizer is None and steps.step_on == "auto":   # (else never active)
            self.session.patches.patch(torch.autograd, "grad", self._wrap_grad)

    def _wrap_grad(self, original):
        """torch.autograd.grad, noted as a backward is: a functional loop takes its
        parameters' gradients with it and updates by hand (no .grad, no backward()). The
        session is held weakly and the wrapper passes through once the block has ended: a
        copy of it may outlive the block (another library's wrapper around it)."""
        ref = weakref.ref(self)
        depth = threading.local()

        def grad(outputs, inputs, *args, **kwargs):
            if not isinstance(inputs, (torch.Tensor, tuple, list)):
                inputs = tuple(inputs)   # a generator (model.parameters()): read it once
            # torch hands a call to a torch function mode by this name (memprof's own
            # UpdateWatch among them), which calls it again: noted once, at the outer call
            outer = not getattr(depth, "n", 0)
            depth.n = getattr(depth, "n", 0) + 1
            try:
                result = original(outputs, inputs, *args, **kwargs)
            finally:
                depth.n -= 1
            auto = ref()
            if outer and auto is not None and not dynamo_compiling() and auto._active() and \
                    torch._C._current_graph_task_id() == -1:   # (not inside a backward)
                outside_dynamo(auto._after_grad, inputs, result)
            return result
        return grad

    def _after_grad(self, inputs, result) -> None:
        try:
            inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
            if not any(isinstance(p, torch.nn.Parameter) for p in inputs):
                return   # (an input's gradient: a penalty, a saliency map)
            tracked = {id(p) for p in self.session.params()}
            pairs = [(g, p) for p, g in zip(inputs, result)
                     if id(p) in tracked and isinstance(g, torch.Tensor)]
        except Exception:  # noqa: BLE001  (recording must never break the user's grad call)
            return
        if pairs:
            # the loop's backward is over, as backward()'s wrapper marks it (BackwardHook): the
            # update and the next batch are not backward
            _C.backward_end(self.session.steps.step)
            self.session.snapshots.take(CAT_GRADIENTS, pairs)
            self._watch([p for _, p in pairs])

    def _active(self) -> bool:
        steps = self.session.steps
        return not steps.explicit and steps.step_on == "auto" and not self.closed

    def _after_backward(self) -> None:
        steps = self.session.steps
        if steps.explicit and steps.step_on == "auto":
            # steps are marked by an optimizer or prof.step() from now on (explicit stays
            # set), which also notes the gradients: nothing left to do after any backward
            self.session.backward.after.remove(self._after_backward)
            return
        if not self._active() and (steps.step_on == "auto" or len(steps.optimizers)):
            return
        params = [p for p in self.session.params() if p.grad is not None]
        if not params:
            return
        self.session.snapshots.take(CAT_GRADIENTS, [(p.grad, p) for p in params])
        self._watch(params)

    def _watch(self, params: list) -> None:
        """After a pass that made these parameters' gradients: look for their change (the
        update) at the next forward, and watch where the update runs."""
        if self._active() and self._before is None:
            # gradient accumulation: keep the state before the update
            prints = [fingerprint([p]) for p in params]
            self._params = [weakref.ref(p) for p in params]
            self._before = None if any(f is None for f in prints) else prints
            # only now is there a change to look for at the next forward (None: values that
            # cannot be read, fake or meta - nothing to look for)
            if self._before is not None:
                self.session.scope.before_forward.append(self.check)
        if self._before is not None:
            try:
                self.update.open(params)   # until the next forward (each micro-step's backward)
            except Exception:  # noqa: BLE001  (recording must never break the user's backward)
                pass

    def check(self) -> None:
        """End the step if the parameters changed since the backward that made their grads."""
        if self._before is None:
            return
        if not self._active():   # for good: steps are marked explicitly now
            self._stop_checking()
        elif self._changed():
            self._stop_checking(step_ended=True)
            self.session.steps.end_step(explicit=False)
        else:   # a micro-step of an accumulation: no update yet, nothing to watch in a forward
            self.update.close(step_ended=False)

    def _changed(self) -> bool:
        """Whether a parameter noted at the backward changed since; one freed since (its
        module was replaced or deleted) is not a change."""
        for ref, before in zip(self._params, self._before):
            p = ref()
            if p is not None and fingerprint([p]) != before:
                return True
        return False

    def close(self) -> None:
        """The block ends: the update watch comes off whatever state it is in, and lets go
        of the callers' globals its call sites hold."""
        self.closed = True
        self.update.close(step_ended=False)
        forget_call_sites()

    def _stop_checking(self, step_ended: bool = False) -> None:
        self.update.close(step_ended)
        self._params, self._before = [], None
        if self.check in self.session.scope.before_forward:
            self.session.scope.before_forward.remove(self.check)
