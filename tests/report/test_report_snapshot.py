"""The memory snapshot of a real run, read with PyTorch's own torch.cuda._memory_viz: every
view has data, the numbers agree with the profile, and the Allocator State History can be
scrubbed to any event (every live block inside a live segment)."""
import pickle

import numpy as np
import torch.cuda._memory_viz as viz

import memprof
from memprof.plan.allocator import simulate
from memprof.report.snapshot import memory_snapshot


def _lines(flamegraph_text):
    return flamegraph_text     # instead of format_flamegraph: the raw "stack size" lines


def _raw(text: str) -> list[tuple[str, int]]:
    out = []
    for line in text.splitlines():
        stack, _, size = line.rpartition(" ")
        out.append((stack, int(size)))
    return out


def test_pickle_loads_and_every_memory_viz_view_has_data(leaky_profile, tmp_path):
    path = tmp_path / "s.pickle"
    memprof.export(leaky_profile, str(path))
    snap = pickle.loads(path.read_bytes())
    summary = viz.segsum(snap)                 # raises on any accounting mismatch
    assert f"segments: {len(snap['segments'])}" in summary and snap["segments"]
    text = viz.trace(snap)
    trace = snap["device_traces"][0]
    assert text.count("cudaMalloc(") == sum(e["action"] == "segment_alloc" for e in trace) > 0
    for html in (viz.segment_plot(snap), viz.trace_plot(snap)):
        assert "snapshot.pickle" in html and len(html) > 1000
    live_end = int(leaky_profile.live_bytes()[-1])
    for fn in (viz.segments, viz.memory):
        rows = _raw(fn(snap, format_flamegraph=_lines))
        active = sum(s for stack, s in rows if ";active_allocated;" in stack
                     and not stack.endswith("<gaps>"))
        assert active == live_end              # what is alive at the end, in requested bytes
        reserved = sum(s for _, s in rows)
        assert reserved == sum(seg["total_size"] for seg in snap["segments"])


def test_active_memory_timeline_peak_is_the_profile_peak(leaky_profile):
    snap = memory_snapshot(leaky_profile)
    live = peak = 0
    for e in snap["device_traces"][0]:          # what the viewer's timeline stacks
        if e["action"] == "alloc":
            live += e["size"]
        elif e["action"] == "free_completed":
            live -= e["size"]
        peak = max(peak, live)
    assert peak == leaky_profile.peak
    cats = {e["category"] for e in snap["device_traces"][0] if e["action"] == "alloc"}
    assert {"parameters", "gradients", "optimizer_state"} <= cats
    assert any(e.get("category") == "unknown" for e in snap["device_traces"][0])


def _replay_checks(snap):
    """Forward through the trace as the viewer's Allocator State History does (backwards
    from the final state): every block must lie in a live segment at every event, and the
    end state must be the snapshot's segments."""
    segs = {}
    first = snap["memprof"]["trace_from_event"] == 0
    blocks = {}
    if not first:                     # a truncated trace starts from the state it implies
        return
    for k, e in enumerate(snap["device_traces"][0]):
        a, s = e["addr"], e["size"]
        if e["action"] == "segment_alloc":
            assert all(not (b <= a < b + n) for b, n in segs.items())
            segs[a] = s
        elif e["action"] == "segment_free":
            assert not any(a <= b < a + s for b in blocks), f"event {k}: segment freed in use"
            del segs[a]
        elif e["action"] == "alloc":
            assert any(b <= a and a + s <= b + n for b, n in segs.items()), f"event {k}"
            assert a not in blocks
            blocks[a] = s
        elif e["action"] == "free_completed":
            assert blocks.pop(a) == s
    end = {seg["address"]: seg["total_size"] for seg in snap["segments"]}
    assert end == segs
    active = {b["address"]: b["requested_size"] for seg in snap["segments"]
              for b in seg["blocks"] if b["state"] == "active_allocated"}
    assert active == blocks


def test_allocator_state_history_is_consistent(leaky_profile):
    snap = memory_snapshot(leaky_profile)
    _replay_checks(snap)
    for seg in snap["segments"]:
        assert sum(b["size"] for b in seg["blocks"]) == seg["total_size"]
        addr = seg["address"]
        for b in seg["blocks"]:
            assert b["address"] == addr
            addr += b["size"]
            assert b["size"] >= b["requested_size"]


def test_frames_name_module_op_and_cpu(leaky_profile):
    snap = memory_snapshot(leaky_profile)
    assert snap["memprof"]["device"] == "cpu"
    allocs = [e for e in snap["device_traces"][0] if e["action"] == "alloc"]
    assert all(e["frames"][-1]["filename"] == "cpu" for e in allocs)
    fwd = [e for e in allocs if e["frames"][0]["filename"] == "encoder.0"]
    assert fwd and any(e["frames"][0]["name"] == "aten::linear" for e in fwd)
    # ancestors of the module are frames too, innermost first, up to the model
    assert [f["filename"] for f in fwd[0]["frames"]] == ["encoder.0", "encoder", "Net", "cpu"]
    bwd = [e for e in allocs if "(backward of " in e["frames"][0]["name"]]
    assert bwd


def test_a_truncated_trace_still_loads(leaky_profile):
    snap = memory_snapshot(leaky_profile, max_entries=100)
    trace = snap["device_traces"][0]
    assert sum(e["action"] in ("alloc", "free_requested", "free_completed")
               for e in trace) <= 100
    assert snap["memprof"]["trace_from_event"] > 0
    viz.segsum(snap)
    assert viz.trace(snap)


def test_layout_places_blocks_without_overlap():
    rng = np.random.default_rng(0)
    n = 2000
    sizes = rng.integers(1, 8 << 20, n)
    order = rng.permutation(n)        # everything allocated, then freed in random order
    size = np.concatenate([sizes, -sizes[order]]).astype(np.int64)
    ptr = np.concatenate([np.arange(n), order]).astype(np.uint64)
    r = simulate((ptr, size), return_layout=True)
    addr, bsize = r.layout["block_addr"][:n], r.layout["block_size"][:n]
    assert (bsize >= sizes).all() and (bsize % 512 == 0).all()
    o = np.argsort(addr)
    assert (addr[o][1:] >= addr[o][:-1] + bsize[o][:-1]).all()     # all alive at once
    seg = r.layout["segments"]
    assert seg["size"][seg["action"] == 1].sum() == r.peak_reserved


def _stacks(profile) -> set[tuple[str, ...]]:
    snap = memory_snapshot(profile)
    return {tuple(f["filename"] for f in e["frames"]) for e in snap["device_traces"][0]
            if e["action"] == "alloc"}


def test_a_bare_containers_stacks_name_the_model_once():
    """A Sequential's children read 'Sequential.0': the stack repeated the model
    ('Sequential.0 / Sequential / Sequential / cpu'), tracked with the model or in auto mode
    (`memprof run`)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for tracker in (lambda: memprof.track(model, opt),
                    lambda: memprof.track(optimizer=opt, auto_modules=True)):
        with tracker() as prof:
            for _ in range(2):
                model(torch.randn(4, 8)).sum().backward()
                opt.step()
                opt.zero_grad()
        stacks = _stacks(prof.profile)
        assert ("Sequential.0", "Sequential", "cpu") in stacks
        assert ("Sequential.2.0", "Sequential.2", "Sequential", "cpu") in stacks
        assert not [s for s in stacks if s.count("Sequential") > 1]
