"""Memory and FLOPs of a training step at any micro-batch, from estimates at two batch sizes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..profile import Profile
from .streams import canonical_order, free_tokens, reserved_peak, step_stream

if TYPE_CHECKING:
    from .estimate import Estimate

__all__ = ["BatchModel", "Prediction", "SEARCH_LIMIT"]

SEARCH_LIMIT = 1 << 16   # the largest micro-batch max_batch tries: an answer "at least this"


@dataclass
class Prediction:
    """A step predicted for any micro-batch from two estimates (an estimate too)."""
    batch_size: int
    accumulation: int
    precision: str
    checkpointing: str
    peak_allocated: int
    peak_reserved: int
    flops: int
    bytes_allocated: int
    ops: int
    exact: bool   # True: event sizes interpolated one by one (same op sequence in both runs)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _op_names(profile: Profile) -> list[str]:
    strings = profile.strings
    return [strings[i] if 0 <= i < len(strings) else "" for i in profile.memory["op"].tolist()]


def _same_op_sequence(pl: Profile, ph: Profile) -> bool:
    """Whether two runs of a step dispatched the same ops and made and freed the same
    allocations, up to the order of frees that happen at once (streams.canonical_order):
    autocast's weight casts, freed at the forward's end in an order set by their addresses,
    came the other way round in about half the runs, which made the batch model inexact
    (peaks interpolated, and extrapolated down) at random."""
    ml, mh = pl.memory, ph.memory
    if ml.size != mh.size or not np.array_equal(np.sign(ml["size"]), np.sign(mh["size"])):
        return False
    tl, th = free_tokens(pl), free_tokens(ph)
    cl, ch = canonical_order(pl.effective_size, tl), canonical_order(ph.effective_size, th)
    names_l, names_h = np.array(_op_names(pl), dtype=object), np.array(_op_names(ph), dtype=object)
    return (np.array_equal(tl[cl], th[ch]) and np.array_equal(names_l[cl], names_h[ch])
            and np.array_equal(pl.category[cl], ph.category[ch]))


class BatchModel:
    """Memory and FLOPs of a step as a function of the micro-batch, from estimates at two
    batch sizes. When both runs dispatched the same ops (the usual case), every allocation's
    size is affine in the batch and is interpolated one by one; the allocator model then
    replays the synthesized stream, so any batch is predicted (peak and reserved) without
    another fake run. Otherwise the peaks themselves are interpolated linearly."""

    def __init__(self, lo: Estimate, hi: Estimate, stream=None):
        """stream(profile, variant) -> (ptr, size): default `streams.step_stream`; a
        distributed plan passes one rank's (memprof.plan.distributed)."""
        stream = stream or step_stream
        if lo.batch_size >= hi.batch_size:
            lo, hi = hi, lo
        if lo.batch_size == hi.batch_size:
            raise ValueError("BatchModel: need estimates at two different batch sizes")
        self.lo, self.hi = lo, hi
        self.precision, self.checkpointing = lo.precision, lo.checkpointing
        self._streams = {}
        pl, ph = lo.profile, hi.profile
        self.exact = _same_op_sequence(pl, ph)
        if self.exact:
            for variant in ("steady", "accumulate", "first"):
                p1, s1 = stream(pl, variant)
                _, s2 = stream(ph, variant)
                self._streams[variant] = (p1, s1.astype(np.float64), s2.astype(np.float64))
        self._cache: dict = {}

    def _lerp(self, a, b, batch):
        t = (batch - self.lo.batch_size) / (self.hi.batch_size - self.lo.batch_size)
        return a + (b - a) * t

    def _rising(self, a, b, batch):
        """_lerp with the slope held at 0 or more."""
        return self._lerp(a, max(a, b), batch)

    def predict(self, batch_size: int, accumulation: int = 1, *, variant: str | None = None,
                reserved: bool = True) -> Prediction:
        variant = variant or ("steady" if accumulation <= 1 else "accumulate")
        key = (batch_size, accumulation, variant, reserved)
        if key in self._cache:
            return self._cache[key]
        b = int(batch_size)
        flops = int(round(self._lerp(self.lo.flops, self.hi.flops, b)))
        byts = int(round(self._lerp(self.lo.bytes_allocated, self.hi.bytes_allocated, b)))
        if self.exact:
            ptr, s1, s2 = self._streams[variant]
            size = np.rint(self._lerp(s1, s2, b)).astype(np.int64)
            alloc = int(np.cumsum(size).max())
            res = reserved_peak(ptr, size) if reserved else 0
        else:   # the peaks; never falling with the batch (two noisy points, extrapolated
            # down, had every micro-batch fit)
            alloc = int(round(self._rising(self.lo.peak(variant), self.hi.peak(variant), b)))
            res = int(round(self._rising(self.lo.peak(variant, True),
                                         self.hi.peak(variant, True), b)))
        if accumulation > 1 and variant == "accumulate":
            # accumulation keeps the gradients: it never needs less than accumulation 1 (the
            # first micro-step of each optimizer step is one), so every user of a prediction
            # - the search's max micro-batch and Plan.predict - sees the same number
            one = self.predict(b, 1, reserved=reserved)
            alloc, res = max(alloc, one.peak_allocated), max(res, one.peak_reserved)
        p = Prediction(batch_size=b, accumulation=accumulation, precision=self.precision,
                       checkpointing=self.checkpointing, peak_allocated=alloc,
                       peak_reserved=res, flops=flops, bytes_allocated=byts, ops=self.lo.ops,
                       exact=self.exact)
        self._cache[key] = p
        return p

    def max_batch(self, budget: int, accumulation: int = 1, limit: int = SEARCH_LIMIT) -> int:
        """Largest micro-batch whose predicted reserved bytes stay within budget (0: none;
        `limit`: the search stopped there, so the answer is 'at least limit')."""
        def ok(b):
            return self.predict(b, accumulation).peak_reserved <= budget
        if not ok(1):
            return 0
        lo = 1
        # linear guess from the allocated peaks, then bracket
        slope = max(1.0, (self.hi.steady_peak_reserved - self.lo.steady_peak_reserved)
                    / (self.hi.batch_size - self.lo.batch_size))
        guess = int(max(1, min(limit, (budget - self.predict(1, accumulation).peak_reserved)
                               / slope + 1)))
        hi = guess
        if ok(hi):
            lo = hi
            hi = min(limit, max(hi + 1, int(hi * 1.25)))
            while hi < limit and ok(hi):
                lo, hi = hi, min(limit, hi * 2)
            if hi >= limit and ok(limit):
                return limit
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
        return lo
