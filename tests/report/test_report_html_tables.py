"""The HTML report's finding cards and tables, read back from real small runs: steps named as
ranges, a count of steps as a count, breakdown tables that add up, and step columns only for
what the run recorded."""
import time

import torch
from torch import nn

import memprof
from memprof.report.html import step_ranges
from memprof.units import fmt_bytes
from report_page import Page


def _page(profile, tmp_path, name="r.html") -> Page:
    path = tmp_path / name
    memprof.export(profile, str(path))
    return Page(path.read_text(encoding="utf-8"))


def _facts(card) -> dict:
    dts = [e.all_text() for e in card.find_all("dt")]
    dds = [e.all_text() for e in card.find_all("dd")]
    return dict(zip(dts, dds))


def _card(page: Page, kind: str):
    return next(c for c in page.find_all("article") if c.attrs["data-kind"] == kind)


def _header(page: Page) -> list[str]:
    steps = page.find_all("table", **{"class": "steps"})[0]
    return [th.text for th in steps.find_all("th")]


def test_step_ranges():
    assert step_ranges(list(range(66))) == "0-65"
    assert step_ranges([5, 0, 1, 2]) == "0-2, 5"
    assert step_ranges([3]) == "3"


def test_a_card_names_its_steps_as_ranges(leaky_profile, tmp_path):
    prof = leaky_profile
    leak = next(f for f in prof.findings if f.kind == "retained_graph")
    steps = leak.evidence["steps"]
    assert len(steps) > 2 and steps == list(range(steps[0], steps[-1] + 1))
    facts = _facts(_card(_page(prof, tmp_path), "retained_graph"))
    assert facts["steps"] == f"{steps[0]}-{steps[-1]}"


class _SlowData(torch.utils.data.Dataset):
    """A dataset that takes 20 ms per sample: the loop waits for it."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        time.sleep(0.02)
        return torch.randn(4), torch.randn(1)


def test_a_count_of_measured_steps_is_labelled_as_a_count(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(_SlowData(), batch_size=1)
    with memprof.track(model, opt) as prof:
        for x, y in loader:
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    found = next(f for f in prof.profile.findings if f.kind == "data_loader_starvation")
    measured = found.evidence["steps"]
    facts = _facts(_card(_page(prof.profile, tmp_path), "data_loader_starvation"))
    assert facts["steps measured"] == str(measured) and "steps" not in facts


def _deep_run():
    """20 Linear layers: more modules alive at the peak than the tables' 15 rows."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(20)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt) as prof:
        for _ in range(2):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
    return prof.profile


def test_breakdown_tables_end_with_the_rest_and_add_up(tmp_path):
    prof = _deep_run()
    modules = list(prof.breakdown("module").items())
    assert len(modules) > 15
    details = _page(prof, tmp_path).by_id("details").find_all("details")
    table = next(d for d in details if d.find_all("summary")[0].text.endswith("by module"))
    rows = [[td.all_text() for td in tr.find_all("td")] for tr in table.find_all("tbody")[0]
            .find_all("tr")]
    assert len(rows) == 16 and rows[:15] == [[k, fmt_bytes(v)] for k, v in modules[:15]]
    rest = modules[15:]
    assert rows[15] == [f"... {len(rest)} more", fmt_bytes(sum(b for _, b in rest))]


def test_step_columns_only_for_what_was_recorded(tmp_path):
    """No eval column without an evaluation pass, no 'before clip' column without clipping."""
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt, health=True) as prof:
        for _ in range(3):
            loss = model(torch.randn(4, 8)).sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
            prof.log(loss=loss.item())
    header = _header(_page(prof.profile, tmp_path))
    assert "eval" not in header and "grad norm before clipping" not in header
    assert {"loss", "grad norm", "LR", "forward"} <= set(header)


def test_an_evaluation_pass_and_clipping_get_their_columns(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt, health=True) as prof:
        for _ in range(3):
            model(torch.randn(4, 8)).sum().backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                model(torch.randn(64, 8))
    header = _header(_page(prof.profile, tmp_path))
    assert {"eval", "grad norm before clipping", "after clipping"} <= set(header)


def test_the_bar_legend_uses_the_column_names(leaky_profile, tmp_path):
    page = _page(leaky_profile, tmp_path)
    header = _header(page)
    steps = page.by_id("steps")
    keys = [s.attrs["data-key"] for s in steps.find_all("span") if "data-key" in s.attrs]
    assert keys and set(keys) <= set(header)
    assert "before forward" in keys and "data" not in keys
