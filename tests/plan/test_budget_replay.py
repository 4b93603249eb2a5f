"""A budget without the GPU: real (small) CPU runs replayed against a byte budget or a GPU of
the table - where they run out, why, and when a leak would."""
import pytest
import torch

import memprof
from memprof.plan.budget import capacity_of, replay
from memprof.plan.gpus import usable_bytes

MIB = 1 << 20
BATCH = 384          # the kept activation is BATCH x 1024 float32 = 1.5 MiB per step


class Leaky(torch.nn.Module):
    """An MLP that keeps each forward's hidden activation (with its graph) in a list, like
    DCAL's attention history: 1.5 MiB more alive after every step."""
    def __init__(self, leak: bool):
        super().__init__()
        self.fc1, self.act, self.fc2 = (torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                                        torch.nn.Linear(1024, 10))
        self.leak, self.history = leak, []

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.leak:
            self.history.append(h)
        return self.fc2(h)


def leaky_run(steps: int, budget=None, leak: bool = True):
    """The MLP trained for `steps` steps under memprof.track(budget=budget)."""
    torch.manual_seed(0)
    model = Leaky(leak)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = [(torch.randn(BATCH, 256), torch.randint(0, 10, (BATCH,))) for _ in range(steps)]
    with memprof.track(model, opt, budget=budget) as prof:
        for x, y in data:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return prof


@pytest.fixture(scope="module")
def unlimited():
    """Per-step peak reserved bytes of a 12-step leaky run, replayed without a limit."""
    prof = leaky_run(12)
    return prof, replay(prof, 1 << 40).per_step


def test_leak_exceeding_a_byte_budget_is_growth_at_the_step_it_fails(unlimited):
    _, per_step = unlimited
    peaks = [s["peak_reserved"] for s in per_step]
    assert all(b >= a for a, b in zip(peaks, peaks[1:])) and peaks[-1] > peaks[2]
    budget = peaks[7] + MIB // 2            # step 7 fits, a later one does not
    first_over = next(i for i, p in enumerate(peaks) if p > budget)
    prof = leaky_run(12, budget=budget)
    b = prof.meta["budget"]
    assert not b["fits"] and b["capacity"] == budget and b["total_memory"] is None
    fail = b["failure"]
    assert first_over <= fail["where"]["step"] <= first_over + 1
    assert fail["cause"]["cause"] == "growth"
    assert fail["cause"]["slope_bytes_per_step"] == pytest.approx(1.5 * MIB, rel=0.02)
    assert fail["reserved"] <= budget and fail["reserved"] + fail["request"] > budget
    assert fail["alive"]["by_category"]["activations"] >= 1.5 * MIB * (first_over - 1)
    [f] = [f for f in prof.findings if f.kind == "budget"]
    assert f.severity == "error" and f"step {fail['where']['step']}" in f.message
    assert "fit" not in prof.meta          # a leak gets no "smaller batch" advice


def test_projected_step_of_a_leak_matches_a_longer_run(unlimited):
    _, per_step = unlimited
    budget = per_step[5]["peak_reserved"] + 12 * int(1.5 * MIB)
    short = leaky_run(6, budget=budget)
    b = short.meta["budget"]
    assert b["fits"] and b["failure"] is None
    proj = b["projection"]
    assert proj["method"] == "replay of synthesized steps"
    assert proj["leak_bytes_per_step"] == pytest.approx(1.5 * MIB, rel=0.01)
    predicted = proj["step"]
    assert 6 < predicted <= 40          # beyond the recorded steps
    [f] = [f for f in short.findings if f.kind == "budget"]
    assert f.severity == "warning" and f"step ~{predicted}" in f.message
    # the same loop, run long enough, fails where the projection said
    long = leaky_run(predicted + 3, budget=budget)
    actual = long.meta["budget"]["failure"]["where"]["step"]
    assert abs(actual - predicted) <= 1, (predicted, actual)


def test_a_run_that_fits_a_v100_reports_its_headroom():
    prof = leaky_run(4, budget="v100-16gb", leak=False)
    b = prof.meta["budget"]
    assert b["fits"] and b["budget"] == "v100-16gb"
    assert b["capacity"] == usable_bytes("v100-16gb")
    assert b["headroom"] == b["capacity"] - b["peak_reserved"]
    assert b["peak_reserved"] >= b["peak_allocated"] >= prof.peak * 0.9
    assert b["projection"] is None and b["peak"]["step"] in range(4)
    assert not [f for f in prof.findings if f.kind == "budget"]


def test_replay_of_a_loaded_profile_is_the_same(unlimited, tmp_path):
    prof, _ = unlimited
    path = tmp_path / "leak.memprof"
    prof.save(str(path))
    a, b = replay(prof, 40 * MIB), replay(memprof.load(str(path)), 40 * MIB)
    assert a.as_dict() == b.as_dict()


def test_bad_budgets_are_one_line_errors():
    with pytest.raises(ValueError, match="v100-16gb"):
        memprof.track(budget="v200-99gb")
    for bad in (0, -5, True, 3.5):
        with pytest.raises(ValueError, match="budget"):
            capacity_of(bad)
    assert capacity_of("a100-40gb")[1] == "a100-40gb"
    assert capacity_of(123456789)[0] == 123456789


def test_a_request_under_what_looks_free_says_the_segment_it_needs():
    """"requesting 1.50 MiB with 2.00 MiB of 10.00 MiB reserved" read as a paradox: the
    caching allocator reserves a 20 MiB segment for a request of 1-10 MiB that no cached
    block holds, and that is what does not fit."""
    from memprof.plan.allocator import new_segment_bytes
    prof = leaky_run(2, leak=False)
    result = replay(prof, 10 * MIB)
    f = result.failure
    assert f is not None and MIB < f["request"] < 10 * MIB
    assert f["reserved"] + f["request"] < 10 * MIB          # it looks as if it fitted
    assert f["segment"] == 20 * MIB
    assert "no cached block holds it, and the new 20.00 MiB segment" in result.summary
    assert [new_segment_bytes(n) for n in (1, MIB, MIB + 1, 9 * MIB, 10 * MIB + 1)] == \
        [2 * MIB, 2 * MIB, 20 * MIB, 20 * MIB, 12 * MIB]
    assert new_segment_bytes(MIB + 1, expandable_segments=True) == 2 * MIB
