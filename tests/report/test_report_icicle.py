"""The module icicle of the HTML report on a real run of a deep module tree: every level is
drawn (it stopped at depth 6: BERT's attention.self never showed), and a chart that does stop
says so."""
import torch
from torch import nn

import memprof
from memprof.report.html_data import module_nodes
from memprof.report.svg import icicle
from report_page import Page

LEVELS = 9


class Wrap(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def _deep_profile():
    """A Linear wrapped LEVELS times: its module path is inner.inner. ... .inner."""
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    for _ in range(LEVELS):
        model = Wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt) as prof:
        for _ in range(2):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
    return prof.profile


def _drawn(svg_text: str) -> dict:
    page = Page(svg_text)
    return {g.attrs["data-module"]: int(g.attrs["data-bytes"])
            for g in page.find_all("g", **{"class": "node"})}


def test_the_whole_depth_of_the_tree_is_drawn(tmp_path):
    prof = _deep_profile()
    deepest = ".".join(["inner"] * LEVELS)
    tree = prof.module_tree()
    assert tree[deepest]["total"] > 0
    path = tmp_path / "deep.html"
    memprof.export(prof, str(path))
    page = Page(path.read_text(encoding="utf-8"))
    svg = page.find_all("svg", **{"class": "icicle"})[0]
    drawn = {g.attrs["data-module"]: int(g.attrs["data-bytes"])
             for g in svg.find_all("g", **{"class": "node"})}
    assert drawn[deepest] == tree[deepest]["total"]        # depth LEVELS + 1 below the root
    assert not svg.find_all("text", **{"class": "cut"})


def test_a_chart_cut_short_says_so():
    prof = _deep_profile()
    nodes = module_nodes(prof)
    svg = icicle(nodes, max_depth=4)
    drawn = _drawn(svg)
    assert max(n["depth"] for n in nodes if n["name"] in drawn) == 4
    assert "modules more than 4 levels deep are not drawn" in svg
    assert "levels deep are not drawn" not in icicle(nodes)
