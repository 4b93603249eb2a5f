"""The real allocator's segments in the memory snapshot of a CUDA run.

On the CPU: the placement of allocator segment actions among memprof's events
(report/snapshot_segments.py), fed with segment actions written for a real CPU run's own
blocks (one segment per block, at the block's address, timed by a clock pair that is off
by milliseconds on purpose): every block must lie inside a live segment at every trace entry.
On a GPU (gpu mark): a real CUDA run, its snapshot against torch.cuda.memory._snapshot().
"""
import pickle

import numpy as np
import pytest
import torch
import torch.cuda._memory_viz as viz

import memprof
from memprof.report.snapshot import _Frames, _trace
from memprof.report.snapshot_segments import real_layout, recorded_segments


def _segment_actions(profile, keep, clock_error_ns):
    """One segment per kept allocation [ptr, ptr + size): allocated at its allocation's
    time, freed at its free's time, in Unix microseconds through a skewed clock pair."""
    mem = profile.memory
    rows = np.flatnonzero(keep & (mem["size"] > 0))
    unix_minus_mono = 1_700_000_000_000_000_000
    acts = []                  # (row, action, address, size), in the rows' order
    for r in rows.tolist():
        acts.append((r, "segment_alloc", int(mem["ptr"][r]), int(mem["size"][r])))
        f = int(profile.free_of[r])
        if f >= 0:
            acts.append((f, "segment_free", int(mem["ptr"][r]), int(mem["size"][r])))
    acts.sort()
    actions = [{"action": a, "addr": p, "size": s, "stream": 0,
                "time_us": (int(mem["t_ns"][r]) + unix_minus_mono + clock_error_ns) // 1000}
               for r, a, p, s in acts]
    return {"device": 0, "segments": [], "actions": actions,
            "clock": {"unix_ns": unix_minus_mono, "monotonic_ns": 0}}


def _segments_at_start(segments, trace):
    """The segments alive before the trace: those at the end, with its actions undone."""
    live = {s["address"]: s["total_size"] for s in segments}
    for e in reversed(trace):
        if e["action"] == "segment_alloc":
            live.pop(e["addr"], None)
        elif e["action"] == "segment_free":
            live[e["addr"]] = e["size"]
    return live


def _check_blocks_inside_live_segments(trace, live_segments=None):
    live_segments, live_blocks = dict(live_segments or {}), {}
    for e in trace:
        a = e["action"]
        if a == "segment_alloc":
            live_segments[e["addr"]] = e["size"]
        elif a == "segment_free":
            inside = [b for b in live_blocks if e["addr"] <= b < e["addr"] + e["size"]]
            assert not inside, f"segment {e['addr']:#x} freed with live blocks"
            del live_segments[e["addr"]]
        elif a == "alloc":
            assert any(s <= e["addr"] < s + n for s, n in live_segments.items()), \
                f"block {e['addr']:#x} outside every live segment"
            live_blocks[e["addr"]] = e["size"]
        elif a == "free_completed":
            live_blocks.pop(e["addr"], None)
    return live_segments


@pytest.mark.parametrize("clock_error_ns", [0, 20_000, -200_000, 3_000_000, -3_000_000])
def test_segment_actions_are_placed_around_the_blocks_they_hold(leaky_profile,
                                                                clock_error_ns):
    p = leaky_profile
    size = p.memory["size"]
    keep = (size > 0) | ((size < 0) & (p.alloc_of >= 0))
    rec = _segment_actions(p, keep, clock_error_ns)
    assert recorded_segments(p) is None            # a CPU run keeps the model's segments
    layout = real_layout(p, keep, rec)
    events = layout["segments"]["event"]
    assert (np.diff(events) >= 0).all() and len(events) == len(rec["actions"])
    trace = _trace(p, keep, layout, _Frames(p, "cpu"), 0)
    assert sum(e["action"].startswith("segment_") for e in trace) == len(rec["actions"])
    alive = _check_blocks_inside_live_segments(trace)
    ends_alive = keep & (size > 0) & (p.free_of < 0)
    assert sorted(alive) == sorted(p.memory["ptr"][ends_alive].tolist())


@pytest.mark.gpu
def test_cuda_run_exports_the_real_allocators_segments(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(),
                                torch.nn.Linear(2048, 512)).cuda()
    opt = torch.optim.AdamW(model.parameters())
    kept = []
    with memprof.track(model, opt) as prof:
        for _ in range(3):
            loss = model(torch.randn(256, 512, device="cuda")).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            kept.append(loss)
        torch.cuda.synchronize()
    truth = torch.cuda.memory._snapshot()
    p = prof.profile
    rec = p.run.records["cuda_segments"]
    assert recorded_segments(p) is rec and rec["actions"]
    path = tmp_path / "s.pickle"
    memprof.export(p, str(path))
    snap = pickle.loads(path.read_bytes())
    assert snap["memprof"]["segments_from"].startswith("the CUDA caching allocator")
    dev = snap["memprof"]["device_index"]
    real = {(s["address"], s["total_size"]) for s in truth["segments"] if s["device"] == dev}
    assert {(s["address"], s["total_size"]) for s in snap["segments"]} == real
    viz.segsum(snap)                                # raises on any accounting mismatch
    trace = snap["device_traces"][dev]
    alive = _check_blocks_inside_live_segments(trace, _segments_at_start(snap["segments"], trace))
    assert sorted(alive) == sorted(a for a, _ in real)
    live = peak = 0
    for e in trace:
        live += e["size"] if e["action"] == "alloc" else \
            -e["size"] if e["action"] == "free_completed" else 0
        peak = max(peak, live)
    assert peak == p.peak
    params = {t.data_ptr() for t in model.parameters()}
    named = [b for s in snap["segments"] for b in s["blocks"]
             if b["address"] in params and b["frames"]]
    assert len(named) == len(params)                # memprof names the real blocks
