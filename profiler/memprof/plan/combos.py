"""The search behind `memprof.recommend`: every precision x checkpointing policy estimated.

Per combination: two fit estimates (micro-batches `FIT_BATCHES`), the batch model
(`memprof.plan.batch_model`), the largest micro-batch that fits, and - when the batch model
interpolates peaks - an estimate confirming that boundary. The estimates are the jobs, run side
by side in forked worker processes (`memprof.plan.parallel`): a combination's two fits run
at once, and the load stays even when policies differ in cost. `Search.finish` then confirms
the option a plan recommends (see `memprof.plan.search`).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from ..record.events import CAT_GRADIENTS, PREEXISTING_THREAD
from .batch_model import BatchModel
from .checkpoint import checkpoints_itself, parse_policy
from .errors import PlanInputError
from .estimate import Estimator
from .own_checkpointing import policy_ran, skip_reason, text as own_text
from .parallel import Pool, default_workers
from .step_failure import batch_mismatch, explain, origin, plain_step_raises, raised_at
from .workloads import BatchError, batch_form

__all__ = ["Search", "Combination", "FIT_BATCHES"]

FIT_BATCHES = (2, 4)


@dataclass
class Combination:
    """One precision x checkpointing policy of a plan: its batch model (None: not estimated,
    see skipped / error) and the largest micro-batch that fits."""
    precision: str
    checkpointing: str
    model: BatchModel | None = None
    max_micro_batch: int = 0
    confirmed_at: int | None = None
    confirm_agreed: bool | None = None
    skipped: str | None = None
    error: str | None = None
    state_bytes: int = 0         # what the step holds at any micro-batch (the fit estimate):
    params_bytes: int = 0        # its parameters (converted ones as converted), the
    gradient_bytes: int = 0      # gradients it allocates, and the optimizer state
    wall_s: float = 0.0

    @property
    def checkpointing_text(self) -> str:
        """The policy as estimated: "model's own" where the model checkpoints itself."""
        if self.model is None:
            return self.checkpointing
        lo = self.model.lo
        return own_text(self.checkpointing, lo.own_checkpoints > 0,
                        policy_ran(self.checkpointing, lo))


def gradients_allocated(profile) -> int:
    """Bytes of the gradients a step allocates (those of the trainable parameters)."""
    mem = profile.memory
    grads = (profile.category == CAT_GRADIENTS) & (mem["size"] > 0) & \
        (mem["thread"] != PREEXISTING_THREAD)
    return int(mem["size"][grads].sum())


def _shorten(message: str, limit: int) -> str:
    """An error message for a table cell: whole, or its first sentence, or cut at a word."""
    if len(message) <= limit:
        return message
    sentence = message.find(". ")
    if 0 < sentence < limit:
        return message[:sentence + 1]
    return message[:limit].rsplit(" ", 1)[0] + " ..."


class Search:
    """Estimates every precision x policy: two fit estimates, the batch model, the largest
    micro-batch that fits, and (confirm=True) an estimate at that boundary when the batch
    model interpolates peaks; `finish` then confirms the recommended option."""

    def __init__(self, estimator: Estimator, usable: int, effective_batch: int, *, confirm,
                 blocks, progress, model_name: str, workers: int | None = 1):
        self.estimator, self.usable, self.effective_batch = estimator, usable, effective_batch
        self.confirm, self.blocks, self.progress = confirm, blocks, progress
        self.model_name = model_name
        self.runs = self.done = self.total = 0
        self._none_added = False    # run(): "none" estimated first though not listed
        self._errors: dict[tuple[str, str], tuple] = {}   # a failed estimate's error, batch
        self.workers = default_workers() if workers is None else max(1, int(workers))
        self._pid = os.getpid()

    def _tick(self, label: str) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total, label)

    def _estimate(self, batch: int, c: Combination):
        self.runs += 1
        return self.estimator.step(batch, precision=c.precision, checkpointing=c.checkpointing,
                                   blocks=self.blocks)

    def run(self, precisions: list[str], policies: list[str]) -> dict:
        """Every precision x policy, one estimate per job spread over `workers` processes
        (memprof.plan.parallel): the two fit estimates of a combination run side by side, and
        a worker never waits for a long combination's second half. A precision's other
        policies wait for its first: 'none' when listed (wherever the user listed it), else
        the first policy. When the whole effective batch fits without checkpointing, or the
        model checkpoints its blocks itself, they are skipped; a model that checkpoints
        itself is then estimated as it runs ('none', the model's own) even when 'none' was
        not listed: memprof's policies would checkpoint its blocks a second time. Where its
        Hugging Face flags say so before any forward, 'none' is added up front, so no
        estimate of the first policy is made only to be dropped."""
        combos: dict[tuple[str, str], Combination] = {}
        waiting: dict[str, list] = {}
        # a model whose Hugging Face checkpointing is on (its flags say so before any
        # forward) is estimated as it runs first: memprof's first policy would be estimated
        # only to be dropped for it
        user_model = getattr(self._base(), "_user_model", None)
        self._none_added = user_model is not None and checkpoints_itself(user_model) and \
            all(parse_policy(pol)[0] != "none" for pol in policies)
        if self._none_added:
            policies = ["none", *policies]
        for prec in precisions:      # each precision's first policy ahead of its others
            order = sorted(policies, key=lambda pol: parse_policy(pol)[0] != "none")
            for pol in order:
                combos[(prec, pol)] = Combination(prec, pol)
            waiting[prec] = [(prec, pol) for pol in order[1:]]
        self.total = len(combos) * len(FIT_BATCHES) + (1 if self.confirm else 0)
        ready = [(prec, next(pol for p, pol in combos if p == prec)) for prec in precisions]
        first = {prec: pol for prec, pol in ready}
        fits: dict[tuple[str, str], dict] = {}
        # a worker keeps to one micro-batch where it can: its fake-op cache is keyed on shapes
        pool = Pool(self._estimate_job, min(self.workers, len(ready) * len(FIT_BATCHES)),
                    affinity=lambda job: job[1])
        for key in ready:
            for b in FIT_BATCHES:
                pool.submit((key, b))
        for (key, batch), (est, error) in pool.results():
            c = combos[key]
            self.runs += 1
            self.done += 1
            if c.error is not None:        # an earlier estimate of it failed
                continue
            if error is not None:
                self._failed(c, error, batch, first=key == ready[0])
            elif batch in FIT_BATCHES:
                c.wall_s += est.wall_s
                fits.setdefault(key, {})[batch] = est
                if len(fits[key]) < len(FIT_BATCHES):
                    continue
                target = self._model(c, *(fits[key][b] for b in FIT_BATCHES))
                if target is not None:      # interpolated peaks: confirm the boundary
                    self.total += 1
                    pool.submit((key, target))
                    continue
            else:
                c.wall_s += est.wall_s
                self._confirm(c, batch, self._accumulation(batch), est)
            prec, pol = key
            self._tick(f"{prec} {pol}: {'failed' if c.error else 'estimated'}")
            if pol == first[prec]:
                self._after_first(combos, c, waiting.pop(prec), pool)
        self._all_failed_alike(combos)
        return combos

    def _after_first(self, combos: dict, c: Combination, waiting: list, pool) -> None:
        """A precision's first policy is known: skip or submit its others. A first policy
        that is memprof's and finds the model's own checkpoints is skipped too, and the
        model estimated as it runs in its place ('none', added ahead of the others)."""
        none = parse_policy(c.checkpointing)[0] == "none"
        fits_all = none and c.model is not None and c.model.predict(
            self.effective_batch, 1).peak_reserved <= self.usable
        own = c.model.lo.own_checkpoints if c.model is not None else 0
        if own and not none:
            c.model, c.max_micro_batch, c.confirmed_at = None, 0, None
            c.skipped = skip_reason(own, instead=True)
            rest = list(combos.items())
            combos.clear()
            for key, combo in rest:
                if combo is c:
                    combos[(c.precision, "none")] = Combination(c.precision, "none")
                combos[key] = combo
            self.total += len(FIT_BATCHES)
            for b in FIT_BATCHES:
                pool.submit(((c.precision, "none"), b))
        for later in waiting:
            if own or fits_all:
                instead = not none or self._none_added
                combos[later].skipped = skip_reason(own, instead=instead) if own else (
                    f"not estimated: without checkpointing the whole effective batch "
                    f"{self.effective_batch} already fits in {c.precision}")
                self.done += len(FIT_BATCHES)
                self._tick(f"{c.precision} {later[1]}: skipped")
            else:
                for b in FIT_BATCHES:
                    pool.submit((later, b))

    def _estimate_job(self, job: tuple[tuple[str, str], int]):
        """One estimate (precision x policy, micro-batch), here or in a worker process ->
        (the Estimate or None, None or (error type name, message, where the model's own
        code raised it or None, where it came from: step_failure.raised_at)). Bad user input
        (the batch function raised, ...) is raised as a PlanInputError."""
        (precision, checkpointing), batch = job
        try:
            est = self.estimator.step(batch, precision=precision, checkpointing=checkpointing,
                                      blocks=self.blocks)
        except BatchError as e:
            raise PlanInputError(str(e)) from None
        except PlanInputError:
            raise
        except Exception as e:  # noqa: BLE001  (one policy failing must not hide the rest)
            return None, (type(e).__name__, (str(e).splitlines() or [""])[0], origin(e),
                          raised_at(e))
        if os.getpid() != self._pid:
            est.profile.run.live = None    # live objects stay in the worker
        return est, None

    def _failed(self, c: Combination, error: tuple, batch: int, first: bool) -> None:
        name, message, where, _ = error
        c.model = None
        c.error = f"estimate failed: {name}: {_shorten(message, 240)}"
        self._errors[(c.precision, c.checkpointing)] = (error, batch)
        if first and parse_policy(c.checkpointing)[0] == "none":
            # the plain step fails: the model / loss / batch is the problem (step_failure
            # tells the model's own error from a fake-tensor one)
            plain = None if where is not None else \
                plain_step_raises(self._base(), batch, c.precision)
            self._explain(error, plain)

    def _base(self) -> Estimator:
        return getattr(self.estimator, "base", self.estimator)

    def _explain(self, error: tuple, plain) -> None:
        """Raise the one line (and hint) of step_failure.explain for a failed plain step."""
        name, message, where, _ = error
        base = self._base()
        make_batch = base.make_batch
        fn = getattr(make_batch, "__name__", "batch")
        mismatch = batch_mismatch(base._user_model, make_batch, fn) \
            if name == "TypeError" else None
        if mismatch is not None:   # the batch, not the model or fake tensors
            raise PlanInputError(mismatch) from None
        raise PlanInputError(explain(
            self.model_name, name, _shorten(message, 240), where, plain,
            fn, batch_form(make_batch))) from None

    def _all_failed_alike(self, combos: dict) -> None:
        """Without 'none' first (--checkpointing every), every policy estimated failing with
        one error that a plain step (no checkpointing) raises too - or, where no plain step
        is tried, that the model's own code raised - is the model's own, said as a failed
        'none' says it. Otherwise memprof's checkpointing may be what failed, and the rows
        keep it. (Each row read 'estimate failed', and the plan 'no combination could be
        estimated', with no word of the model's own code or a hint.) One error is one type
        raised from one place, whatever its text: a text naming the batch size differs
        between policies that failed at their own micro-batches."""
        tried = [key for key, c in combos.items() if c.skipped is None]
        if not tried or any(key not in self._errors for key in tried) or \
                len({(self._errors[key][0][0], self._errors[key][0][3]) for key in tried}) != 1:
            return
        error, batch = self._errors[tried[0]]
        plain = plain_step_raises(self._base(), batch, tried[0][0])
        if plain == error[0] or (plain is None and error[2] is not None):
            self._explain(error, plain)

    def _accumulation(self, micro_batch: int) -> int:
        return max(1, math.ceil(self.effective_batch / micro_batch))

    def _model(self, c: Combination, lo, hi) -> int | None:
        """The batch model from the two fit estimates -> the micro-batch whose estimate
        confirms it (interpolated peaks, confirm=True), else None."""
        c.model = BatchModel(lo, hi, stream=getattr(self.estimator, "stream", None))
        end = lo.profile.breakdown("category", at="end")
        c.state_bytes, c.params_bytes = end.get("optimizer_state", 0), end.get("parameters", 0)
        c.gradient_bytes = gradients_allocated(lo.profile)
        c.max_micro_batch = c.model.max_batch(self.usable, accumulation=2)
        eb = self.effective_batch
        target = c.max_micro_batch if c.max_micro_batch < eb else eb
        if not self.confirm or c.model.exact or target < 1:
            return None
        if target in (lo.batch_size, hi.batch_size):   # estimates are deterministic: reuse
            self._confirm(c, target, self._accumulation(target))
            return None
        return target

    def _fit(self, c: Combination) -> None:
        """Fit one combination here, one estimate after the other (a plan's later query)."""
        t1 = time.perf_counter()
        label = f"{c.precision} {c.checkpointing}"
        est = []
        for b in FIT_BATCHES:
            self._tick(f"{label}: micro-batch {b}")
            est.append(self._estimate(b, c))
            self.done += 1
        target = self._model(c, *est)
        if target is not None:
            self._confirm(c, target, self._accumulation(target))
        c.wall_s = time.perf_counter() - t1

    def _confirm(self, c: Combination, target: int, acc: int, est=None) -> bool:
        """Compare the batch model with the estimate at micro-batch `target` (accumulation
        `acc`; estimated now unless given or a fit estimate) -> whether they agree within
        0.5 %; when they do not, refit on the points nearest `target`."""
        self._tick(f"{c.precision} {c.checkpointing}: confirming micro-batch {target}")
        lo, hi = c.model.lo, c.model.hi
        variant = "steady" if acc == 1 else "accumulate"
        est = est or {lo.batch_size: lo, hi.batch_size: hi}.get(target)  # deterministic: reuse
        if est is None:
            self.runs += 1
            est, error = self._estimate_job(((c.precision, c.checkpointing), target))
            if error is not None:
                # the model's step raises at the micro-batch the fit predicts (a limit of its
                # own, past the fit estimates): the combination is no option (the error left
                # recommend bare, with no row, place or hint)
                self._failed(c, error, target, first=False)
                c.error = f"estimate at micro-batch {target} failed: {error[0]}: " \
                    f"{_shorten(error[1], 240)}"
                return False
        pred = c.model.predict(target, acc)
        actual = est.peak(variant, reserved=True)
        if variant == "accumulate":   # as predicted: never less than accumulation 1 needs
            actual = max(actual, est.peak("steady", reserved=True))
        c.confirmed_at = target
        c.confirm_agreed = abs(actual - pred.peak_reserved) <= 0.005 * max(actual, 1)
        if not c.confirm_agreed and target != hi.batch_size:
            c.model = BatchModel(hi, est, stream=getattr(self.estimator, "stream", None))
            c.max_micro_batch = c.model.max_batch(self.usable, accumulation=2)
        return c.confirm_agreed

    def finish(self, plan) -> None:
        """With confirm=True, confirm the best option of `plan` (a `search.Plan`) when its
        combination has no confirmation yet (an exact batch model); a disagreement refits
        that combination and ranks the options again, and the new best is confirmed in
        turn. Then progress says done."""
        for _ in range(len(plan.combinations) if self.confirm else 0):
            best = plan.best
            if best is None:
                break
            c = plan._combos[(best.precision, best.checkpointing)]
            if c.confirmed_at is not None:
                break
            agreed = self._confirm(c, best.micro_batch, best.accumulation)
            self.done += 1
            plan._rank()            # the option now says it is confirmed (or was refitted)
            if agreed:
                break
        if plan.best is None:   # every combination failed, the last ones at confirming
            self._all_failed_alike(plan._combos)
        plan.estimates = self.runs
        self.done = self.total = max(self.done, self.total)
        self._tick("done")
