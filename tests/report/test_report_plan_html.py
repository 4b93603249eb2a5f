"""The plan page (memprof recommend --html): predicted memory against micro-batch per
precision and checkpointing policy, the GPU's usable line and the best option, as drawn."""
import pytest

import memprof
from memprof import cli
from memprof.plan.gpus import lookup
from memprof.report.plan_html import micro_batches
from report_page import Page

MiB = 1 << 20


@pytest.fixture(scope="module")
def plan():
    usable = 80 * MiB        # a V100 shrunk so that larger micro-batches of a tiny ViT do not fit
    return memprof.recommend("vit-tiny", gpu="v100-16gb", effective_batch=64,
                             precisions=["fp16", "fp32"], policies=["none"], confirm=False,
                             overhead=lookup("v100-16gb").memory_bytes - usable, margin=0.0)


def test_curves_usable_line_and_best(plan, tmp_path):
    path = tmp_path / "plan.html"
    memprof.export(plan, str(path))
    page = Page(path.read_text())
    curves = page.find_all("g", **{"class": "curve"})
    assert {(g.attrs["data-precision"], g.attrs["data-checkpointing"]) for g in curves} == \
        {("fp16", "none"), ("fp32", "none")}
    for g in curves:
        prec, pol = g.attrs["data-precision"], g.attrs["data-checkpointing"]
        for c in g.find_all("circle"):
            m = int(c.attrs["data-micro-batch"])
            o = plan.predict(m, prec, pol)
            assert int(c.attrs["data-bytes"]) == o.peak_reserved
            assert ("does not fit" in c.find_all("title")[0].text) == (not o.fits)
    drawn = [int(c.attrs["data-bytes"]) for g in curves for c in g.find_all("circle")]
    assert min(drawn) < plan.usable_bytes < max(drawn)       # the line cuts the curves
    usable = page.find_all("g", **{"class": "usable"})[0]
    assert int(usable.attrs["data-bytes"]) == plan.usable_bytes
    best = page.find_all("g", **{"class": "best"})[0]
    b = plan.best
    assert (int(best.attrs["data-micro-batch"]), best.attrs["data-precision"],
            best.attrs["data-checkpointing"], int(best.attrs["data-bytes"])) == \
        (b.micro_batch, b.precision, b.checkpointing, b.peak_reserved)
    rows = page.find_all("tr", **{"class": "best"})
    assert len(rows) == 1 and rows[0].find_all("td")[0].text == b.precision
    assert "estimate" in page.find_all("header")[0].all_text()
    assert not page.find_all("script")                       # static: no script needed


def test_micro_batches_reach_past_the_largest_fit(plan):
    xs = micro_batches(plan)
    assert xs[0] == 1 and xs == sorted(set(xs))
    top = max(c.max_micro_batch for c in plan.combinations)
    assert xs[-1] > top and plan.effective_batch in xs


def test_cli_recommend_writes_html(tmp_path, capsys):
    out = tmp_path / "plan.html"
    rc = cli.main(["recommend", "--gpu", "t4", "--model", "mlp", "--effective-batch", "8",
                   "--precision", "fp16", "--checkpointing", "none", "--no-confirm",
                   "--html", str(out)])
    _, err = capsys.readouterr()
    assert rc == 0 and f"wrote {out}" in err.replace("\n", "")
    page = Page(out.read_text())
    assert page.find_all("g", **{"class": "best"})


def test_plan_axis_stops_where_the_search_stopped():
    from types import SimpleNamespace
    from memprof.plan.batch_model import SEARCH_LIMIT
    from memprof.report.plan_html import micro_batches
    capped = SimpleNamespace(model=object(), max_micro_batch=SEARCH_LIMIT)
    plan = SimpleNamespace(effective_batch=64, combinations=[capped])
    assert max(micro_batches(plan)) == SEARCH_LIMIT
