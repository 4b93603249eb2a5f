"""The HTML report's budget section: a run replayed against a budget it does not fit shows the
budget panel and what would fit, as the terminal report prints them (a finding's fix says
"see 'what would fit'")."""
import html
import io
import re

import torch
from rich.console import Console
from torch import nn

import memprof
from memprof import track_budget
from memprof.report.html import TERMINAL_COLUMNS
from memprof.report.oom import print_sections
from report_page import Page


def _run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters())
    with memprof.track(model, opt, batch_size=32) as prof:
        for _ in range(3):
            model(torch.randn(32, 64)).sum().backward()
            opt.step()
            opt.zero_grad()
    return prof.profile


def _terminal(profile) -> str:
    console = Console(record=True, file=io.StringIO(), width=TERMINAL_COLUMNS)
    print_sections(profile, console)
    return console.export_text()


def test_a_budget_the_run_does_not_fit_shows_the_panel_and_what_would_fit(tmp_path):
    prof = _run()
    track_budget.apply(prof, prof.peak // 2)
    budget, fit = prof.meta["budget"], prof.meta["fit"]
    assert budget["failure"] and fit
    finding = next(f for f in prof.findings if "what would fit" in f.fix)
    path = tmp_path / "b.html"
    memprof.export(prof, str(path))
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    pre = re.search(r'<section id="budget">.*?<pre[^>]*>(.*?)</pre>', text, re.S).group(1)
    shown = html.unescape(re.sub(r"<[^>]+>", "", pre))     # the text, in order
    assert shown.strip() == _terminal(prof).strip()        # what the terminal shows
    assert "What would fit" in shown and f"instead of step {fit['step']}" in shown
    assert memprof.units.fmt_bytes(budget["capacity"]) in shown
    assert memprof.units.fmt_bytes(budget["failure"]["request"]) in shown
    assert "does not fit" in shown
    nav = [a.attrs["href"] for a in page.find_all("a")]
    assert "#budget" in nav
    card = next(c for c in page.find_all("article") if c.attrs["data-kind"] == finding.kind)
    assert "what would fit" in card.all_text()


def test_no_budget_no_section(tmp_path):
    prof = _run()
    path = tmp_path / "n.html"
    memprof.export(prof, str(path))
    page = Page(path.read_text(encoding="utf-8"))
    assert not page.find_all(id="budget")
    assert "#budget" not in [a.attrs.get("href") for a in page.find_all("a")]
