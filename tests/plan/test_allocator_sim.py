"""The CUDA caching-allocator model: one hand-made event sequence per rule, exact numbers.

Rules come from c10/cuda/CUDACachingAllocator.cpp; see csrc/allocator_sim.cpp. A randomized
differential test compares the native replay with a slow, plain-Python statement of the same
rules (non-expandable mode), which exercises the native index and hash-map code paths.
"""
import bisect
import random

import numpy as np
import pytest

import memprof
from memprof.plan.allocator import SimResult, simulate

KiB = 1 << 10
MiB = 1 << 20


def A(p, n):
    return (p, n)


def F(p, n=1):
    return (p, -n)


def run(events, **kw) -> SimResult:
    ptr = np.array([p for p, _ in events], dtype=np.uint64)
    size = np.array([s for _, s in events], dtype=np.int64)
    return simulate((ptr, size), **kw)


# ---------------------------------------------------------------------------- sizes and pools
def test_rounding_to_512_bytes():
    r = run([A(1, 1), A(2, 513), A(3, 512)])
    assert list(r.allocated) == [512, 512 + 1024, 512 + 1024 + 512]
    assert r.peak_requested == 1 + 513 + 512
    assert r.peak_reserved == 2 * MiB and r.max_segments == 1


def test_small_pool_two_mib_segments_shared():
    r = run([A(1, MiB), A(2, MiB), A(3, MiB)])
    assert list(r.reserved) == [2 * MiB, 2 * MiB, 4 * MiB]
    assert r.num_device_alloc == 2 and r.segments_end == 2
    # 1 MiB + 1 byte rounds to 1 MiB + 512: large pool, 20 MiB segment
    assert run([A(1, MiB + 1)]).peak_reserved == 20 * MiB


def test_small_pool_split_down_to_512_bytes():
    r = run([A(i, 512) for i in range(4096)] + [A(9999, 512)])
    assert r.reserved[4095] == 2 * MiB and r.allocated[4095] == 2 * MiB
    assert r.reserved[-1] == 4 * MiB and r.num_device_alloc == 2


def test_mid_size_requests_share_a_20mib_segment_and_last_one_takes_the_rest():
    # 1.5 MiB requests: a 20 MiB segment is split while more than 1 MiB would remain;
    # the 13th request gets the whole 2 MiB remainder (0.5 MiB left is not > 1 MiB).
    n = 13
    r = run([A(i, 3 * MiB // 2) for i in range(n + 1)])
    assert r.reserved[0] == 20 * MiB
    assert r.reserved[n - 1] == 20 * MiB and r.allocated[n - 1] == 20 * MiB
    assert r.reserved[n] == 40 * MiB and r.num_device_alloc == 2


@pytest.mark.parametrize("request_bytes, segment", [
    (int(9.9 * MiB), 20 * MiB),   # < 10 MiB: 20 MiB segment
    (10 * MiB, 10 * MiB),         # >= 10 MiB: rounded up to 2 MiB
    (int(29.1 * MiB), 30 * MiB),
    (30 * MiB, 30 * MiB),
    (30 * MiB + 1, 32 * MiB),
])
def test_large_segment_sizes(request_bytes, segment):
    r = run([A(1, request_bytes)])
    assert r.peak_reserved == segment and r.num_device_alloc == 1


def test_unsplit_remainder_counts_as_allocated():
    # 29.1 MiB in a 30 MiB segment: 0.9 MiB remainder is not > 1 MiB, block stays whole
    r = run([A(1, int(29.1 * MiB))])
    assert r.peak_allocated == 30 * MiB and r.fragmentation_at_peak == 0.0


# ---------------------------------------------------------------------------- reuse and splitting
def test_free_then_reuse_needs_no_new_segment():
    r = run([A(1, 30 * MiB), F(1), A(2, 30 * MiB), F(2), A(3, 30 * MiB)])
    assert r.num_device_alloc == 1 and r.peak_reserved == 30 * MiB
    assert list(r.allocated) == [30 * MiB, 0, 30 * MiB, 0, 30 * MiB]


def test_split_remainder_is_reused():
    # 4 MiB from a new 20 MiB segment leaves a 16 MiB free block that serves 16 MiB exactly
    r = run([A(1, 4 * MiB), A(2, 16 * MiB)])
    assert list(r.reserved) == [20 * MiB, 20 * MiB]
    assert r.allocated[-1] == 20 * MiB and r.num_device_alloc == 1


def test_best_fit_takes_the_smallest_block_that_fits():
    # segment 20 MiB: [a 4][b 2][c 8][d 2][rest 4]; free a and c -> free blocks 4, 8, 4(rest)
    ev = [A(1, 4 * MiB), A(2, 2 * MiB), A(3, 8 * MiB), A(4, 2 * MiB), F(1), F(3)]
    r = run(ev + [A(5, 3 * MiB)])
    # a 4 MiB block is chosen (3 MiB + 1 MiB remainder: no split) rather than the 8 MiB one
    assert r.allocated[-1] - r.allocated[-2] == 4 * MiB
    assert r.num_device_alloc == 1
    # 7 MiB: only the 8 MiB block fits; 1 MiB remainder is not split off
    r = run(ev + [A(5, 7 * MiB)])
    assert r.allocated[-1] - r.allocated[-2] == 8 * MiB and r.num_device_alloc == 1


def test_coalescing_serves_a_larger_block_without_a_new_segment():
    # [a 6][b 6][c 6][rest 2]: freeing a and b merges them into 12 MiB
    ev = [A(1, 6 * MiB), A(2, 6 * MiB), A(3, 6 * MiB), F(1), F(2), A(4, 12 * MiB)]
    r = run(ev)
    assert r.num_device_alloc == 1 and r.peak_reserved == 20 * MiB
    assert r.allocated[-1] == 18 * MiB
    # three-way merge: free c between free neighbours -> whole segment, serves 20 MiB
    r = run([A(1, 6 * MiB), A(2, 6 * MiB), A(3, 6 * MiB), F(1), F(3), F(2), A(4, 20 * MiB)])
    assert r.num_device_alloc == 1 and r.allocated[-1] == 20 * MiB


def test_frees_do_not_release_segments():
    r = run([A(1, 64 * MiB), F(1), A(2, KiB), F(2)])
    assert r.reserved_end == 64 * MiB + 2 * MiB and r.allocated_end == 0
    assert r.segments_end == 2 and r.num_device_free == 0


# ---------------------------------------------------------------------------- max_split_size
def test_max_split_size_keeps_oversize_blocks_for_large_requests():
    base = [A(1, 64 * MiB), F(1)]
    # unlimited (default): 24 MiB is cut from the cached 64 MiB block
    r = run(base + [A(2, 24 * MiB)])
    assert r.num_device_alloc == 1 and r.allocated[-1] == 24 * MiB
    # max_split_size 32 MiB: the oversize block is not used for a smaller request
    r = run(base + [A(2, 24 * MiB)], max_split_size=32 * MiB)
    assert r.num_device_alloc == 2 and r.peak_reserved == 88 * MiB
    # a request >= max_split_size takes a cached block only when < request + 20 MiB, unsplit
    r = run(base + [A(2, 40 * MiB)], max_split_size=32 * MiB)
    assert r.num_device_alloc == 2
    r = run(base + [A(2, 50 * MiB)], max_split_size=32 * MiB)
    assert r.num_device_alloc == 1 and r.allocated[-1] == 64 * MiB


def test_max_split_size_releases_oversize_blocks_before_oom():
    ev = [A(1, 64 * MiB), F(1), A(2, 24 * MiB)]
    r = run(ev, max_split_size=32 * MiB, capacity=80 * MiB)
    assert not r.oom
    assert r.num_device_free == 1 and r.num_alloc_retries == 0
    assert list(r.reserved) == [64 * MiB, 64 * MiB, 24 * MiB]


# ---------------------------------------------------------------------------- capacity and OOM
def test_capacity_releases_cached_segments_then_reports_oom_at_the_right_event():
    ev = [A(1, 30 * MiB), F(1), A(2, 32 * MiB), A(3, 10 * MiB), A(4, KiB)]
    r = run(ev, capacity=40 * MiB)
    # event 2: 30 + 32 > 40 -> the free 30 MiB segment is released, retry succeeds
    assert list(r.reserved) == [30 * MiB, 30 * MiB, 32 * MiB, 32 * MiB]
    assert r.num_alloc_retries == 2 and r.num_device_free == 1
    # event 3: 32 + 10 > 40 and nothing is cached -> OOM; the replay stops there
    assert r.oom and r.oom_event == 3 and r.oom_bytes == 10 * MiB
    assert r.events_replayed == 4 and len(r.allocated) == 4
    assert r.peak_reserved == 32 * MiB
    assert not run(ev, capacity=42 * MiB + 2 * MiB).oom


def test_release_only_frees_unsplit_segments():
    # the 20 MiB segment stays: a live block is in it; 30 MiB segment is fully free
    ev = [A(1, 2 * MiB), A(2, 30 * MiB), F(2), A(3, 40 * MiB)]
    r = run(ev, capacity=64 * MiB)
    assert not r.oom and r.reserved[-1] == 60 * MiB and r.num_device_free == 1


# ---------------------------------------------------------------------------- expandable segments
def test_expandable_maps_pages_not_segments():
    # large pool pages are 20 MiB (kLargeBuffer in the source), small pool pages 2 MiB
    r = run([A(1, 30 * MiB)], expandable_segments=True)
    assert r.peak_reserved == 40 * MiB and r.num_device_alloc == 1 and r.segments_end == 1
    r = run([A(1, KiB), A(2, MiB), A(3, MiB)], expandable_segments=True)
    assert list(r.reserved) == [2 * MiB, 2 * MiB, 4 * MiB] and r.max_segments == 1


def test_expandable_segments_avoid_a_new_segment_for_fragmented_space():
    # two 12 MiB blocks freed, then one 24 MiB request
    ev = [A(1, 12 * MiB), A(2, 12 * MiB), F(1), F(2), A(3, 24 * MiB)]
    r = run(ev)
    assert r.num_device_alloc == 3 and r.peak_reserved == 48 * MiB and r.max_segments == 3
    r = run(ev, expandable_segments=True)
    # 12 -> one 20 MiB page; 12 more -> second page; both free merge into 40 MiB: 24 fits
    assert r.num_device_alloc == 2 and r.peak_reserved == 40 * MiB
    assert r.reserved[-1] == r.reserved[-2] == 40 * MiB
    assert r.max_segments == 1


def test_expandable_flush_unmaps_free_pages_and_remaps():
    # large pool: a 30 MiB block and an 8 MiB block share two 20 MiB pages [0, 40)
    ev = [A(1, 30 * MiB), A(2, 8 * MiB), F(1), A(3, KiB), A(4, 50 * MiB)]
    r = run(ev, expandable_segments=True, capacity=84 * MiB)
    # 50 MiB: no free block fits; growing from the 2 MiB tail at 38 MiB needs 60 MiB of pages:
    # 42 + 60 > 84, so the flush unmaps the one fully free page [0, 20) and retries: 22 + 60
    assert not r.oom
    assert list(r.reserved) == [40 * MiB, 40 * MiB, 40 * MiB, 42 * MiB, 82 * MiB]
    assert r.num_device_free == 1 and r.num_alloc_retries == 1 and r.num_device_alloc == 3
    # the free prefix of a block is reused and extended when it can grow: no flush needed
    r = run([A(1, 30 * MiB), F(1), A(2, 50 * MiB)], expandable_segments=True)
    assert list(r.reserved) == [40 * MiB, 40 * MiB, 60 * MiB] and r.num_alloc_retries == 0


def test_expandable_request_larger_than_the_virtual_range():
    huge = 1 << 45  # 32 TiB: beyond one expandable segment's 16 TiB range
    r = run([A(1, huge), F(1)], expandable_segments=True)
    assert r.peak_reserved == -(-huge // (20 * MiB)) * 20 * MiB and not r.oom


def test_expandable_oom():
    r = run([A(1, 30 * MiB), A(2, 30 * MiB)], expandable_segments=True, capacity=50 * MiB)
    assert r.oom and r.oom_event == 1 and r.oom_bytes == 30 * MiB


# ---------------------------------------------------------------------------- bookkeeping
def test_unknown_frees_ignored_and_counted():
    r = run([F(7, 512), A(1, 512), F(8, 4 * MiB), F(1, 512), F(1, 512)])
    assert r.unknown_frees == 3 and r.num_frees == 1 and r.num_allocs == 1
    assert list(r.allocated) == [0, 512, 512, 0, 0]


def test_duplicate_alloc_frees_the_previous_holder():
    r = run([A(1, MiB), A(1, MiB), F(1)])
    assert r.duplicate_allocs == 1 and list(r.allocated) == [MiB, MiB, 0]


def test_summary_numbers_exact():
    ev = [A(1, 100), A(2, 3 * MiB), A(3, 30 * MiB), F(2), A(4, 5 * MiB), F(1), F(3),
          A(5, 0), F(4)]
    r = run(ev)
    # event 0: small segment 2 MiB; event 1: 20 MiB segment; event 2: 30 MiB segment
    assert list(r.reserved) == [2 * MiB, 22 * MiB] + [52 * MiB] * 7
    assert r.peak_reserved == 52 * MiB and r.peak_reserved_event == 2
    assert r.allocated_at_peak_reserved == 512 + 33 * MiB
    assert r.fragmentation_at_peak == pytest.approx(1 - (512 + 33 * MiB) / (52 * MiB))
    assert r.segments_at_peak == 3 and r.max_segments == 3
    # 5 MiB is cut from the 20 MiB segment once the 3 MiB block is freed and merged
    assert r.peak_allocated == 512 + 35 * MiB
    assert r.peak_requested == 100 + 35 * MiB
    assert r.num_device_alloc == 3 and r.num_device_free == 0
    assert r.reserved_end == 52 * MiB and r.allocated_end == 0 and r.segments_end == 3
    assert r.zero_size_events == 1 and r.num_events == 9 and r.events_replayed == 9
    assert r.num_allocs == 4 and r.num_frees == 4
    assert not r.oom and r.oom_event is None and r.oom_bytes is None
    d = r.as_dict()
    assert "reserved" not in d and d["peak_reserved"] == 52 * MiB


def test_no_timeline():
    r = run([A(1, 100)], return_timeline=False)
    assert r.reserved is None and r.allocated is None and r.peak_reserved == 2 * MiB


def test_empty_stream():
    r = run([])
    assert r.peak_reserved == 0 and r.fragmentation_at_peak == 0.0 and len(r.reserved) == 0


# ---------------------------------------------------------------------------- input forms
def _event_dtype():
    from memprof.record.events import EVENT_DTYPE
    return EVENT_DTYPE


def test_structured_event_array_is_read_in_place_and_non_memory_rows_ignored():
    ev = np.zeros(4, dtype=_event_dtype())
    ev["ptr"] = [1, 2, 1, 3]
    ev["size"] = [MiB, 30 * MiB, -MiB, 5 * MiB]
    ev["kind"] = [0, 0, 0, 1]  # last row: an OOM report, not an allocation
    r = simulate(ev)
    assert r.num_allocs == 2 and r.zero_size_events == 1
    assert list(r.reserved) == [2 * MiB, 32 * MiB, 32 * MiB, 32 * MiB]
    r = simulate(ev, mask=np.array([True, False, True, True]))
    assert r.peak_reserved == 2 * MiB


def test_signed_ptr_and_narrow_size_dtypes_accepted():
    r = simulate((np.array([-1, -1], dtype=np.int64), np.array([512, -512], dtype=np.int32)))
    assert r.num_frees == 1 and r.unknown_frees == 0


@pytest.mark.parametrize("args, kw, exc, text", [
    ((np.zeros(2), np.zeros(2, np.int64)), {}, TypeError, "ptr must be an integer array"),
    ((np.zeros(2, np.uint64), np.zeros(2)), {}, TypeError, "size must be an integer array"),
    ((np.zeros(2, np.uint64), np.zeros(2, np.uint64)), {}, TypeError, "signed"),
    ((np.zeros((2, 2), np.uint64), np.zeros(2, np.int64)), {}, ValueError, "1-D"),
    ((np.zeros(3, np.uint64), np.zeros(2, np.int64)), {}, ValueError, "same length"),
    ((np.zeros(2, np.uint64), np.zeros(2, np.int64)), {"capacity": -1}, ValueError, "capacity"),
    ((np.zeros(2, np.uint64), np.zeros(2, np.int64)), {"capacity": 1.5}, TypeError, "capacity"),
    ((np.zeros(2, np.uint64), np.zeros(2, np.int64)), {"max_split_size": MiB}, ValueError,
     "max_split_size"),
])
def test_bad_input_one_line_errors(args, kw, exc, text):
    with pytest.raises(exc, match=text) as ei:
        simulate(args, **kw)
    assert "\n" not in str(ei.value)


def test_bad_container_and_missing_fields():
    with pytest.raises(TypeError, match="structured event array"):
        simulate(np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="missing \\['size'\\]"):
        simulate(np.zeros(3, dtype=[("ptr", "<u8")]))


def test_native_binding_signature():
    from memprof import _C
    d = _C.simulate_allocator(np.array([1], np.uint64), np.array([512], np.int64),
                              return_timeline=False)
    assert d["peak_reserved"] == 2 * MiB and d["reserved"] is None
    with pytest.raises(ValueError, match="same length"):
        _C.simulate_allocator(np.array([1], np.uint64), np.array([], np.int64))


# ---------------------------------------------------------------------------- differential test
class _Reference:
    """Plain-Python statement of the non-expandable rules (slow, obvious data structures)."""

    def __init__(self, capacity=0, mss=None):
        self.cap, self.mss = capacity, (mss or float("inf"))
        self.blocks = {}   # id -> [addr, size, prev, next, allocated, small]
        self.free = {True: [], False: []}  # sorted (size, addr, id)
        self.live, self.va, self.nid = {}, 1 << 40, 0
        self.reserved = self.allocated = 0
        self.segments = self.n_malloc = self.n_free = 0

    def _new(self, addr, size, prev, nxt, small):
        self.nid += 1
        self.blocks[self.nid] = [addr, size, prev, nxt, False, small]
        return self.nid

    def _key(self, b):
        blk = self.blocks[b]
        return (blk[1], blk[0], b)

    def _alloc_block(self, small, alloc_size):
        if self.cap and self.reserved + alloc_size > self.cap:
            return None
        b = self._new(self.va, alloc_size, None, None, small)
        self.va += -(-alloc_size // (2 * MiB)) * 2 * MiB
        self.reserved += alloc_size
        self.segments += 1
        self.n_malloc += 1
        return b

    def _release(self, small, b):
        self.free[small].remove(self._key(b))
        self.reserved -= self.blocks[b][1]
        self.segments -= 1
        self.n_free += 1
        del self.blocks[b]

    def malloc(self, p, req):
        if p in self.live:
            self._free_block(self.live.pop(p))
        size = 512 if req < 512 else -(-req // 512) * 512
        small = size <= MiB
        pool = self.free[small]
        i = bisect.bisect_left(pool, (size, 0, 0))
        b = None
        if i < len(pool):
            bs = pool[i][0]
            if not ((size < self.mss and bs >= self.mss) or
                    (size >= self.mss and bs >= size + 20 * MiB)):
                b = pool.pop(i)[2]
        if b is None:
            alloc_size = (2 * MiB if small else 20 * MiB if size < 10 * MiB
                          else -(-size // (2 * MiB)) * 2 * MiB)
            b = self._alloc_block(small, alloc_size)
            if b is None and self.mss != float("inf"):
                target = max(size, self.mss)
                j = bisect.bisect_left(pool, (target, 0, 0))
                released, ok = 0, False
                if j < len(pool):
                    c = pool[j][2]
                    if self.blocks[c][2] is None and self.blocks[c][3] is None:
                        self._release(small, c)
                        ok = True
                else:
                    for sz, _, c in list(reversed(pool)):
                        if released >= target or sz < self.mss:
                            break
                        if self.blocks[c][2] is None and self.blocks[c][3] is None:
                            released += sz
                            self._release(small, c)
                    ok = released >= target
                if ok:
                    b = self._alloc_block(small, alloc_size)
            if b is None:
                for sm in (False, True):
                    for sz, _, c in list(self.free[sm]):
                        if self.blocks[c][2] is None and self.blocks[c][3] is None:
                            self._release(sm, c)
                b = self._alloc_block(small, alloc_size)
            if b is None:
                return False
        blk = self.blocks[b]
        rem = blk[1] - size
        if (rem >= 512) if small else (size < self.mss and rem > MiB):
            r = self._new(blk[0] + size, rem, b, blk[3], small)
            if blk[3] is not None:
                self.blocks[blk[3]][2] = r
            blk[3], blk[1] = r, size
            bisect.insort(pool, self._key(r))
        blk[4] = True
        self.allocated += blk[1]
        self.live[p] = b
        return True

    def free_(self, p):
        if p in self.live:
            self._free_block(self.live.pop(p))

    def _free_block(self, b):
        blk = self.blocks[b]
        blk[4] = False
        self.allocated -= blk[1]
        pool = self.free[blk[5]]
        for nb in (blk[2], blk[3]):
            if nb is not None and not self.blocks[nb][4]:
                pool.remove(self._key(nb))
                o = self.blocks.pop(nb)
                if nb == blk[2]:
                    blk[0], blk[2] = o[0], o[2]
                    if o[2] is not None:
                        self.blocks[o[2]][3] = b
                else:
                    blk[3] = o[3]
                    if o[3] is not None:
                        self.blocks[o[3]][2] = b
                blk[1] += o[1]
        bisect.insort(pool, self._key(b))


def _random_stream(rng, n, max_live=300, tiny=False):
    sizes = ([rng.randint(1, 4096) for _ in range(20)] + [rng.randint(1, MiB) for _ in range(20)]
             + [rng.randint(MiB, 10 * MiB) for _ in range(10)]
             + [rng.randint(10 * MiB, 80 * MiB) for _ in range(5)])
    live, ev, nxt = [], [], 1
    if tiny:  # few distinct small sizes, random frees: long runs of equal-sized holes
        sizes = [512, 1024, 1536]
        for _ in range(max_live):
            ev.append((nxt, rng.choice(sizes)))
            live.append(nxt)
            nxt += 1
    for _ in range(n):
        u = rng.random()
        if u < (0.55 if len(live) < max_live else 0.35) or not live:
            p = nxt if rng.random() > 0.01 or not live else rng.choice(live)  # rare duplicate
            nxt += 1
            s = rng.choice(sizes)
            ev.append((p, s))
            if p not in live:
                live.append(p)
        elif u < 0.97:
            p = (live.pop() if rng.random() < (0.0 if tiny else 0.6)
                 else live.pop(rng.randrange(len(live))))
            ev.append((p, -1))
        else:
            ev.append((10 ** 9 + rng.randint(0, 10), -512))  # unknown free
    return ev


@pytest.mark.parametrize("seed, n, max_live, capacity, mss", [
    # many live and free blocks (> 64 per pool: the native index splits and merges chunks)
    (0, 8000, 1000, 0, None), (1, 8000, 1000, 0, 40 * MiB), (2, 4000, 300, 0, 20 * MiB),
    (3, 4000, 300, 600 * MiB, None), (4, 4000, 300, 400 * MiB, 30 * MiB),
    # bounded live set near capacity: repeated cache flushes and releases
    (2, 6000, 40, 800 * MiB, None), (2, 6000, 40, 800 * MiB, 30 * MiB),
    (3, 6000, 40, 700 * MiB, 30 * MiB), (1, 6000, 40, 700 * MiB, 30 * MiB),
    # few sizes, many holes: long runs of equal keys inside one size class
    (7, 12000, 3000, 0, None), (8, 12000, 3000, 6 * MiB, None),
])
def test_native_matches_reference_model(seed, n, max_live, capacity, mss):
    ev = _random_stream(random.Random(seed), n, max_live, tiny=seed >= 7)
    r = run(ev, capacity=capacity or None, max_split_size=mss)
    ref = _Reference(capacity, mss)
    res, alc = [], []
    oom_at = None
    for i, (p, s) in enumerate(ev):
        if s > 0:
            if not ref.malloc(p, s):
                oom_at = i
        else:
            ref.free_(p)
        res.append(ref.reserved)
        alc.append(ref.allocated)
        if oom_at is not None:
            break
    assert r.oom == (oom_at is not None) and r.oom_event == oom_at
    assert list(r.reserved) == res
    assert list(r.allocated) == alc
    assert r.num_device_alloc == ref.n_malloc and r.num_device_free == ref.n_free
    assert r.segments_end == ref.segments


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expandable_invariants_on_random_streams(seed):
    ev = _random_stream(random.Random(seed), 4000)
    for cap in (None, 300 * MiB):
        r = run(ev, expandable_segments=True, capacity=cap)
        assert (r.reserved >= r.allocated).all()
        assert (r.reserved % (2 * MiB) == 0).all()
        assert r.max_segments <= 2
        ref = run(ev, capacity=cap)
        # same requests, same rounding: allocated differs only through splitting rules
        assert r.peak_requested == ref.peak_requested or r.oom or ref.oom


# ---------------------------------------------------------------------------- a real stream
def test_replay_of_a_recorded_cpu_stream():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, optimizer=opt) as prof:
        for _ in range(2):
            loss = model(torch.randn(64, 256)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    events = prof.profile.memory
    assert events.size > 0
    r = simulate(events)
    assert r.num_allocs > 0 and r.peak_reserved >= r.peak_allocated > 0
    assert (r.reserved >= r.allocated).all()
    re = simulate(events, expandable_segments=True)
    assert re.peak_allocated > 0
