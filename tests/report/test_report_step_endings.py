"""Steps that did not end as the others, in the Chrome trace and the HTML timeline, on real
runs: a run that raised in its 4th step (the trace had 3 step slices, the exception only in
its metadata) and a run cut short by the event capacity (the trace and the timeline's shading
showed every step marker, 6, the steps table 3)."""
import json

import pytest
import torch
from torch import nn

import memprof
from report_page import Page
from test_report_trace import validate


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    return model, torch.optim.Adam(model.parameters())


def _raised_in_step_3():
    model, opt = _model()
    with pytest.raises(ValueError):
        with memprof.track(model, opt) as prof:
            for i in range(5):
                out = model(torch.randn(8, 16))
                if i == 3:
                    raise ValueError("bad batch at step 3")
                out.sum().backward()
                opt.step()
                opt.zero_grad()
    return prof.profile


def _cut_by_the_capacity():
    model, opt = _model()
    with pytest.warns(RuntimeWarning, match="capacity"):
        with memprof.track(model, opt, capacity=150) as prof:
            for _ in range(6):
                model(torch.randn(8, 16)).sum().backward()
                opt.step()
                opt.zero_grad()
    return prof.profile


def _exports(profile, tmp_path):
    memprof.export(profile, str(tmp_path / "t.json"))
    memprof.export(profile, str(tmp_path / "r.html"))
    trace = json.loads((tmp_path / "t.json").read_text())
    assert validate(trace) == []
    slices = [e for e in trace["traceEvents"] if e.get("cat") == "step"]
    page = Page((tmp_path / "r.html").read_text(encoding="utf-8"))
    rows = page.find_all("table", **{"class": "steps"})[0].find_all("tbody")[0].find_all("tr")
    first_cells = [r.find_all("td")[0].text for r in rows]
    return slices, page.data()["timeline"], first_cells


def test_the_step_a_run_raised_in_has_a_slice_that_says_so(tmp_path):
    prof = _raised_in_step_3()
    assert prof.steps_label == "3 + partial"
    slices, timeline, table = _exports(prof, tmp_path)
    assert [s["name"] for s in slices] == ["step 0", "step 1", "step 2", "step 3 (partial)"]
    assert "raised: ValueError: bad batch at step 3" in slices[-1]["args"]["ended"]
    assert slices[-1]["args"]["peak"] == prof.steps[3].peak
    assert slices[-1]["ts"] >= slices[-2]["ts"] + slices[-2]["dur"] - 1e-3
    assert [s[2] for s in timeline["steps"]] == [0, 1, 2, 3]
    assert timeline["step_notes"] == {"3": "partial"} and table[-1] == "3 (partial)"


def test_a_run_cut_by_the_capacity_shows_the_steps_of_its_table(tmp_path):
    prof = _cut_by_the_capacity()
    kept, marked = len(prof.steps), len(prof.markers("step"))
    assert prof.truncated and 0 < kept < marked
    slices, timeline, table = _exports(prof, tmp_path)
    assert len(slices) == len(timeline["steps"]) == len(table) == kept
    last = kept - 1
    assert slices[-1]["name"] == f"step {last} (cut by the capacity)"
    assert f"{marked - kept} later step(s) ran and were not recorded" in \
        slices[-1]["args"]["ended"]
    assert timeline["step_notes"] == {str(last): "cut by the capacity"}
    assert table[-1] == f"{last} (cut by the capacity)"


def test_a_step_that_allocated_nothing_does_not_shift_the_later_spans():
    """`prof.step()` twice in a row leaves a step with no memory event: the steps table has no
    row for it and numbers the rest on; the spans paired the i-th marker with the i-th row,
    so every later slice was one step early."""
    from memprof.report.series import step_spans
    model, opt = _model()
    with memprof.track(model, opt, step_on="manual") as prof:
        for i in range(4):
            model(torch.randn(8, 16)).sum().backward()
            opt.step()
            opt.zero_grad()
            prof.step()
            if i == 1:
                prof.step()                      # an empty step
    profile = prof.profile
    times = [m["t_ns"] for m in profile.markers("step")]
    assert len(times) == 5 and len(profile.steps) == 4
    spans = step_spans(profile)
    assert [i for _, _, i in spans] == [0, 1, 2, 3]
    # each row's span ends at the marker that ends its memory: the empty step's is skipped
    assert [end for _, end, _ in spans] == [times[0], times[1], times[3], times[4]]
