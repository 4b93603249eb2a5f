"""The HTML report of a real run, read back: the plotted series against the profile, the module
tree, findings first, steps with time split and health, self-contained and static."""
import re

import numpy as np
import torch

import memprof
from memprof.record.events import CATEGORIES
from memprof.report.html_data import undelta
from report_page import Page, path_ys


def _page(profile, tmp_path, name="r.html"):
    path = tmp_path / name
    memprof.export(profile, str(path))
    text = path.read_text(encoding="utf-8")
    return text, Page(text)


def _points(tl: dict, key: str = "points") -> dict:
    p = tl[key]
    return {"t": undelta(p["t"]), "c": np.array([undelta(c) for c in p["c"]]),
            "event": undelta(p["event"]), "step": undelta(p["step"]), "phase": p["phase"],
            "op": p["op"], "module": p["module"]}


def test_plotted_series_match_the_profile(leaky_profile, tmp_path):
    prof = leaky_profile
    _, page = _page(prof, tmp_path)
    tl = page.data()["timeline"]
    pts = _points(tl)
    totals = pts["c"].sum(axis=0)
    # a small profile is plotted event by event: every point is the live bytes after it
    assert pts["event"].tolist() == list(range(prof.memory.size))
    assert totals.tolist() == prof.live_bytes().tolist()
    assert totals.max() == prof.peak
    at_peak = pts["c"][:, int(np.flatnonzero(pts["event"] == prof.peak_index)[0])]
    assert dict(zip(tl["categories"], at_peak.tolist())) == prof.breakdown("category")
    # hover data: step, phase, op and module of the peak event
    k = prof.peak_index
    pe = prof.peak_event
    assert pts["step"][k] == pe["step"] and tl["phases"][pts["phase"][k]] == pe["phase"]
    assert tl["ops"][pts["op"][k]] == pe["op"] and tl["modules"][pts["module"][k]] == pe["module"]
    assert tl["peak"] == {"bytes": prof.peak, "index": prof.peak_index, "t": int(pts["t"][k])}


def test_static_chart_reaches_the_peak(leaky_profile, tmp_path):
    prof = leaky_profile
    _, page = _page(prof, tmp_path)
    svg = page.by_id("timeline-svg")
    layers = svg.find_all("path")
    cats = [p.attrs["data-category"] for p in layers if "data-category" in p.attrs]
    expected = [c for c in CATEGORIES if prof.breakdown("category", at="peak").get(c)
                or c in ("activations",)]
    assert set(cats) >= set(expected) - {"activations"} and cats == sorted(
        cats, key=CATEGORIES.index)                     # stacked in category order
    ymax, top, ph = (float(svg.attrs["data-ymax"]), int(svg.attrs["data-top"]),
                     int(svg.attrs["data-ph"]))
    highest = min(path_ys(layers[-1].attrs["d"]))       # top edge of the stack
    plotted = (top + ph - highest) / ph * ymax
    assert abs(plotted - prof.peak) <= ymax / ph        # within one pixel
    assert ymax >= prof.peak
    # the peak is marked and labelled with its bytes
    peak_g = svg.find_all("g", **{"class": "peak"})[0]
    assert memprof.units.fmt_bytes(prof.peak) in peak_g.all_text()
    # steps are shaded, phases drawn in the strip
    titles = [r.find_all("title")[0].text for r in svg.find_all("rect")]
    assert "step 0" in titles and {"forward", "backward", "optimizer"} <= set(titles)


def test_categories_and_modules_at_the_peak(leaky_profile, tmp_path):
    prof = leaky_profile
    _, page = _page(prof, tmp_path)
    cells = page.by_id("peak").find_all("span")
    table = {c.attrs["data-category"]: int(c.attrs["data-bytes"]) for c in cells
             if "data-category" in c.attrs}
    assert table == prof.breakdown("category")
    nodes = {g.attrs["data-module"]: int(g.attrs["data-bytes"])
             for g in page.find_all("g", **{"class": "node"})}
    assert nodes["all memory at the peak"] == prof.peak
    tree = prof.module_tree()
    assert nodes["Net"] == tree[""]["total"]
    assert nodes["encoder"] == tree["encoder"]["total"] > 0
    assert nodes["Net"] + nodes.get("<outside modules>", 0) == prof.peak
    # the largest allocation alive at the peak comes first, with its op and module
    alive = prof.alive_at("peak")
    biggest = int(prof.memory["size"][alive].max())
    first_row = page.by_id("peak").find_all("tbody")[1].find_all("tr")[0]
    assert first_row.find_all("td")[0].text == memprof.units.fmt_bytes(biggest)


def test_findings_first_steps_and_health(leaky_profile, tmp_path):
    prof = leaky_profile
    text, page = _page(prof, tmp_path)
    assert text.index('id="findings"') < text.index('id="timeline"')
    cards = page.find_all("article")
    assert [c.attrs["data-kind"] for c in cards][0] == "retained_graph"
    card = cards[0].all_text()
    assert "train.<locals>.kept" in card and "Fix:" in card
    steps = page.find_all("table", **{"class": "steps"})[0]
    header = [th.text for th in steps.find_all("th")]
    # no DataLoader in this loop: the time before the forward is not called a data wait
    assert {"before forward", "forward", "backward", "optimizer", "samples/s", "loss",
            "grad norm before clipping", "LR"} <= set(header) and "data" not in header
    rows = steps.find_all("tbody")[0].find_all("tr")
    assert len(rows) == len(prof.steps)
    tp = prof.run.records["throughput"]
    assert tp and rows[0].find_all("td")[1].text == memprof.units.fmt_bytes(prof.steps[0].peak)
    hl = memprof.analyse.health.summarize(prof)["per_step"]
    loss_col = header.index("loss")
    assert float(rows[1].find_all("td")[loss_col].text) == float(f"{hl['loss'][1]:.4g}")
    assert page.find_all("svg", **{"class": "bars"})     # time per step chart


def test_self_contained_and_static(leaky_profile, tmp_path):
    text, page = _page(leaky_profile, tmp_path)
    for e in page.find_all():
        for attr in ("src", "href"):
            v = e.attrs.get(attr)
            assert v is None or v.startswith("#"), (e.tag, attr, v)
    assert not page.find_all("link") and not page.find_all("iframe")
    assert not re.search(r"\b(fetch|XMLHttpRequest|import\()", text)
    # without JavaScript the timeline is already drawn (static SVG before any script runs)
    svg = page.by_id("timeline-svg")
    assert "data-rendered" not in svg.attrs and svg.find_all("path")


def test_a_run_without_optimizer_or_health(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    with memprof.track(model) as prof:
        model(torch.randn(4, 8)).sum().backward()
    _, page = _page(prof.profile, tmp_path)
    header = [th.text for th in page.by_id("steps").find_all("th")]
    assert header[:4] == ["step", "peak", "live at end", "allocated"]
    assert "loss" not in header                       # no health columns without health=True
    assert page.data()["timeline"]["peak"]["bytes"] == prof.profile.peak


def test_a_loss_module_made_at_every_forward_is_one_module_and_the_chart_adds_up():
    """A forward that makes its loss module anew at every call (T5's CrossEntropyLoss): auto
    mode gave each instance an id of its own, all named `<CrossEntropyLoss>` (one more name
    per step), and the HTML module chart, one node per name, lost the bytes of all but one:
    its root, "all memory at the peak", read 516 of 1288 bytes."""
    from torch import nn

    from memprof.report.html_data import module_nodes

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, x, y):
            return nn.CrossEntropyLoss()(self.lin(x), y)

    torch.manual_seed(0)
    model = WithLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(auto_modules=True) as prof:
        for _ in range(4):
            model(torch.randn(16, 8), torch.randint(0, 4, (16,))).backward()
            opt.step()
            opt.zero_grad()
    assert prof.modules.count("<CrossEntropyLoss>") == 1, prof.modules
    nodes = module_nodes(prof.profile)
    assert nodes[0]["total"] == sum(prof.breakdown("category", at="peak").values())
