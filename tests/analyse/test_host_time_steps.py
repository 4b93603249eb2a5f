"""host_time_between_steps (and data_loader_starvation) say a loop waits in nearly every step.
A 3-step run measures 2 steps after its warm-up one: the median of two is their mean, so one
step in which a loaded machine descheduled the process made the finding - an info finding in
the tests' 3-step runs that assert their findings exactly. A run needs 3 measured steps, so
that the median is a step's own."""
from memprof.analyse import throughput as tp


def _host_steps(gaps_ms, step_ms=2.0):
    """Entries of steps that each spend `gaps_ms[i]` on the host before the forward (no
    DataLoader), then train for `step_ms` (forward, backward, optimizer), 16 samples a step."""
    ms, t, e = 1_000_000, 0, []     # (the first step's wait is not measured: no step before it)
    for gap in gaps_ms:
        t += int(gap * ms)
        part = int(step_ms * ms / 4)
        e += [("forward_start", t, 1), ("batch", None, 16), ("forward_end", t + part, 1),
              ("backward_start", t + part, 0), ("backward_end", t + 2 * part, 1),
              ("optimizer_start", t + 3 * part, 1), ("step", t + 4 * part, 1)]
        t += 4 * part
    return e


def _kinds(gaps_ms):
    summary = tp.compute(_host_steps(gaps_ms), clock="host")
    return summary, [f.kind for f in tp.starvation_findings(summary)]


def test_one_descheduled_step_of_a_three_step_run_is_no_finding():
    summary, kinds = _kinds([0.1, 0.1, 30.0])    # a 3-step run: its last step waited 30 ms
    assert summary["steps_measured"] == 2
    assert summary["per_step"]["data_ms"] == [None, 0.1, 30.0]
    assert kinds == []


def test_host_work_in_every_step_is_found_from_three_measured_steps():
    summary, kinds = _kinds([10.0] * 4)
    assert summary["steps_measured"] == 3
    assert kinds == ["host_time_between_steps"]
    # one descheduled step of three measured: the median is a step that did not wait
    assert _kinds([0.1, 30.0, 0.1, 0.1])[1] == []
