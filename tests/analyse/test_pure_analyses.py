"""Analyses are pure functions of a Profile: each is tested here on a hand-built Run."""
import pytest

from memprof.analyse import Outcome, analyse, findings
from memprof.analyse.backward import backward_misuse
from memprof.analyse.growth import memory_growth
from memprof.analyse.health import health_analysis, summarize as health_summary
from memprof.analyse.leaks import retained_graphs
from memprof.analyse.throughput import summarize as throughput_summary, throughput_analysis
from tests.analyse.runs import RunBuilder

KB = 1024


def growing_run(steps: int, leak: int) -> RunBuilder:
    """Each step allocates a 64 KiB temporary and keeps `leak` bytes forever."""
    b = RunBuilder()
    for s in range(steps):
        b.phase = "forward"
        b.alloc(1000 + s, 64 * KB).alloc(5000 + s, leak, op="aten::mul")
        b.free(1000 + s, 64 * KB)
        b.phase = "other"
        b.mark("step")
    return b


def test_growth_found_with_slope_and_culprit():
    prof = growing_run(steps=6, leak=8 * KB).profile()
    (f,) = memory_growth(prof, capacity=1 << 20)
    assert f.kind == "memory_growth" and f.severity == "error"
    assert f.evidence["slope_bytes_per_step"] == pytest.approx(8 * KB)
    assert f.evidence["live_at_step_ends"] == [16 * KB, 24 * KB, 32 * KB, 40 * KB, 48 * KB]
    assert f.evidence["still_alive"][0]["op"] == "aten::mul"
    # the step peak (112 KiB at step 5) grows 8 KiB per step: 912 KiB to go = 114 steps
    # (+-1: the slope is a least-squares fit)
    assert abs(f.evidence["projected_step"] - (5 + 114)) <= 1


def test_flat_memory_is_not_growth():
    assert memory_growth(growing_run(steps=6, leak=0).profile(), capacity=1 << 20) == []


def test_backend_buffers_whose_free_is_unseen_are_not_growth():
    """A collective's buffer freed on a backend thread that reports to no one (NCCL's watchdog
    drops the CUDA tensors of finished work) looks alive forever: not growth."""
    b = RunBuilder()
    for s in range(6):
        b.alloc(1000 + s, 64 * KB).alloc(5000 + s, 8 * KB, op="c10d::_reduce_scatter_base_")
        b.free(1000 + s, 64 * KB)
        b.mark("step")
    prof = b.profile()
    assert prof.breakdown("category", at="end")["communication"] == 6 * 8 * KB
    assert memory_growth(prof, capacity=1 << 20) == []


def test_throughput_from_markers_alone():
    b = RunBuilder()
    t = 0
    for step in range(4):
        for label, dt in (("forward_start", 2_000_000), ("batch", 0), ("forward_end", 3_000_000),
                          ("backward_start", 0), ("backward_end", 5_000_000),
                          ("optimizer_start", 0), ("step", 1_000_000)):
            t += dt
            b.mark(label, 16 if label == "batch" else None, t_ns=t)
    s = throughput_summary(b.profile())
    assert s["steps"] == 4 and s["steps_measured"] == 3 and s["clock"] == "host"
    assert s["per_step"]["forward_ms"] == [3.0] * 4
    assert s["per_step"]["data_ms"][1:] == [2.0] * 3
    assert s["stats"]["samples_per_s"]["median"] == pytest.approx(16 / 11e-3)
    assert throughput_analysis(b.profile()) == []          # 2 of 11 ms: not starved


def test_starvation_needs_a_real_wait():
    b = RunBuilder()
    t = 0
    for step in range(4):
        for label, dt in (("data_start", 0), ("data_end", 8_000_000),
                          ("forward_start", 0), ("forward_end", 1_000_000),
                          ("backward_start", 0), ("backward_end", 1_000_000), ("step", 0)):
            t += dt
            b.mark(label, t_ns=t)
    (f,) = throughput_analysis(b.profile())
    assert f.kind == "data_loader_starvation" and f.evidence["data_fraction_median"] == 0.8


def health_record(norms, losses, clips=()):
    return {"grad": [[s, n, None, [0.1]] for s, n in enumerate(norms)],
            "clips": [{"step": s, "pre": pre, "max_norm": mx, "norm_type": 2.0}
                      for s, pre, mx in clips],
            "losses": [[s, v] for s, v in enumerate(losses)], "timeline": [], "errors": []}


def test_health_from_a_record():
    b = RunBuilder()
    b.records["health"] = health_record([1.0, 1.0, float("inf"), 1.0],
                                        [2.0, 1.9, 1.8, float("nan")])
    prof = b.profile()
    kinds = {f.kind for f in health_analysis(prof)}
    assert kinds == {"nonfinite_loss", "nonfinite_gradients"}
    s = health_summary(prof)
    assert s["nonfinite"]["gradient_steps"] == [2] and s["nonfinite"]["loss_steps"] == [3]
    assert s["lr"]["first"] == 0.1


def test_clipping_every_step_from_a_record():
    b = RunBuilder()
    n = 6
    b.records["health"] = health_record([0.5] * n, [1.0] * n,
                                        clips=[(s, 5.0, 0.5) for s in range(n)])
    (f,) = [f for f in health_analysis(b.profile()) if f.kind.startswith("grad_clip")]
    assert f.kind == "grad_clip_every_step" and f.evidence["steps_clipped"] == n


def test_no_health_without_records():
    prof = RunBuilder().profile()
    assert health_summary(prof) is None and health_analysis(prof) == []


def test_backward_misuse_from_recorded_calls():
    b = RunBuilder()
    b.records["backward"] = [{"roots": [7], "retain_graph": True, "step": 0},
                             {"roots": [7], "retain_graph": False, "step": 0}]
    kinds = sorted(f.kind for f in backward_misuse(b.profile()))
    assert kinds == ["backward_twice", "retain_graph"]


def test_leak_check_needs_the_live_context():
    prof = growing_run(steps=3, leak=KB).profile()       # a loaded profile has no live state
    out = retained_graphs(prof)
    assert isinstance(out, Outcome) and out.findings == []


def test_analyse_reports_a_failing_analysis_and_keeps_the_rest():
    prof = growing_run(steps=6, leak=8 * KB).profile()

    def broken(profile):
        raise RuntimeError("boom")

    def noted(profile):
        return Outcome([], notes=["checked half"], stats={"noted_s": 0.5})

    analyse(prof, [broken, noted, lambda p: memory_growth(p, capacity=1 << 30)])
    assert prof.meta["analysis_errors"] == ["broken could not check: RuntimeError: boom",
                                            "checked half"]
    assert prof.meta["noted_s"] == 0.5
    assert [f.kind for f in findings(prof)] == ["memory_growth"]
    with pytest.raises(ValueError, match="min_severity='fatal'"):
        findings(prof, "fatal")
