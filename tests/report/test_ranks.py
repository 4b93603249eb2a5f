"""The merged report of several ranks' profiles: real tracked runs (one per rank, each with
the rank identity a torchrun job records), saved and read back, merged and reported by
`memprof report a.rank0.memprof a.rank1.memprof`."""
import json
import os

import pytest
import torch

import memprof
from memprof.analyse.ranks import merge_findings, merge_ranks, rank_ranges
from memprof.finding import Finding

from report_page import Page


def _rank_run(rank: int, world: int = 2, batch: int = 16, leak: str | None = "outputs",
              run_id: str = "job-1"):
    """A tracked SGD loop standing for one rank. leak="losses": every loss (and its graph)
    is kept in `losses`; leak="outputs": the outputs are kept in `outputs` instead."""
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses, outputs = [], []
    with memprof.track(model, opt) as prof:
        for _ in range(4):
            out = model(torch.randn(batch, 32))
            loss = out.pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            if leak == "losses":
                losses.append(loss)
            elif leak == "outputs":
                outputs.append(out)
    p = prof.profile
    p.meta.update(rank=rank, world_size=world, local_rank=rank, dist_backend="gloo",
                  run_id=run_id)
    return p


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Rank 0 with batch 16, rank 1 with batch 64 (it peaks higher); both keep their outputs
    (and the graphs behind them) in a list.
    Saved and loaded back, as `memprof report` reads them."""
    d = tmp_path_factory.mktemp("ranks")
    paths = []
    for rank, batch in ((0, 16), (1, 64)):
        path = str(d / f"run.rank{rank}.memprof")
        _rank_run(rank, batch=batch).save(path)
        paths.append(path)
    return paths, [memprof.load(p) for p in paths]


def test_same_leak_on_both_ranks_is_one_finding_with_bytes_per_rank(two_ranks):
    paths, profs = two_ranks
    merged = merge_ranks(list(reversed(profs)), sources=list(reversed(paths)))
    assert [r.rank for r in merged.ranks] == [0, 1]          # in rank order, whatever order given
    assert [r.peak for r in merged.ranks] == [p.peak for p in profs]
    assert profs[1].peak > profs[0].peak
    assert merged.peak_row.rank == 1
    assert merged.imbalance == pytest.approx(profs[1].peak / ((profs[0].peak + profs[1].peak) / 2))
    assert merged.world_size == 2 and merged.backend == "gloo" and merged.missing_ranks == []
    for row, p in zip(merged.ranks, profs):
        assert row.by_category == p.breakdown("category")
        assert sum(row.by_category.values()) == row.peak
        assert row.peak_event == p.peak_event
    leaks = [f for f in merged.findings if f.kind.startswith("retained")]
    per_rank = [[f for f in p.findings if f.kind.startswith("retained")] for p in profs]
    assert len(per_rank[0]) == len(per_rank[1]) == 1
    assert len(leaks) == 1
    assert leaks[0].on_ranks == "on ranks 0-1"
    assert leaks[0].bytes_by_rank == {0: per_rank[0][0].bytes, 1: per_rank[1][0].bytes}
    assert per_rank[0][0].bytes * 4 == per_rank[1][0].bytes  # 4x the batch: 4x the outputs
    assert leaks[0].holder == per_rank[0][0].holder == "_rank_run.<locals>.outputs"


def test_different_findings_stay_separate():
    merged = merge_ranks([_rank_run(0, leak="losses"), _rank_run(1, leak="outputs")])
    leaks = {f.holder.rpartition(".")[2]: f for f in merged.findings
             if f.kind.startswith("retained")}
    assert set(leaks) == {"losses", "outputs"}
    assert leaks["losses"].ranks == [0] and leaks["losses"].on_ranks == "on rank 0"
    assert leaks["outputs"].ranks == [1]


def test_findings_match_up_to_their_numbers():
    def f(msg, b, sev="warning"):
        return Finding(kind="memory_growth", severity=sev, bytes=b, message=msg, fix="x")
    merged = merge_findings([
        (0, [f("live memory grows by 1.50 MiB per step over 8 steps", 10)]),
        (1, [f("live memory grows by 980.00 KiB per step over 8 steps", 7, "error")]),
        (2, [f("live memory grows by 2.00 MiB per step over 8 steps", 12),
             f("live memory grows by 2.00 MiB per step over 8 steps", 3)]),
        (3, [Finding(kind="retain_graph", severity="info", bytes=0, message="m", fix="y")])])
    assert [(g.kind, g.ranks, g.severity) for g in merged] == [
        ("memory_growth", [0, 1, 2], "error"), ("memory_growth", [2], "warning"),
        ("retain_graph", [3], "info")]
    assert merged[0].bytes_by_rank == {0: 10, 1: 7, 2: 12}
    # its figures are rank 0's ("grows by 1.50 MiB" beside 7 and 12 bytes on ranks 1, 2)
    assert merged[0].message == ("as rank 0 states it: live memory grows by 1.50 MiB per "
                                 "step over 8 steps")
    assert merged[1].message.startswith("live memory grows")   # one rank: its own figures
    assert rank_ranges([0, 1, 2, 3, 5, 7, 8]) == "0-3, 5, 7-8"


def test_files_that_are_not_one_job_get_one_clear_line(two_ranks):
    _, (r0, r1) = two_ranks
    clone = memprof.Profile(r1.run)
    cases = {
        "world sizes differ": dict(world_size=4),
        "rank 0 given twice": dict(rank=0),
        "files of different runs": dict(run_id="job-2"),
        "not a rank of a torchrun job .* report the others one at a time": dict(rank=None),
        "rank 3 with world size 2": dict(rank=3),
    }
    for expected, change in cases.items():
        saved = dict(clone.run.meta)
        clone.run.meta = dict(saved, **change)
        with pytest.raises(ValueError, match=expected) as err:
            merge_ranks([r0, clone], sources=["a.rank0.memprof", "b.memprof"])
        assert "\n" not in str(err.value) and "memprof" in str(err.value)
        clone.run.meta = saved


@pytest.fixture
def cli(capsys, monkeypatch):
    """`memprof report ARGS` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setenv("COLUMNS", "250")   # wide enough that rich does not wrap table cells
    from memprof.cli import main

    def call(*args):
        code = main(["report", *args])
        out = capsys.readouterr()
        return code, out.out, out.err
    return call


def test_cli_merges_rank_files_terminal_json_and_html(two_ranks, tmp_path, cli):
    paths, profs = two_ranks
    html, js = str(tmp_path / "merged.html"), str(tmp_path / "merged.json")
    code, out, err = cli(*paths, "--export", html, "--export", js)
    assert code == 0, err
    assert "on ranks 0-1" in out and "imbalance (max/median)" in out
    assert "on rank 1 at step" in out
    code, out, _ = cli(*paths, "--json", "--fail-on-findings")
    assert code == 3                                            # the leak is a finding
    data = json.loads(out)
    assert data["peak_rank"] == 1 and data["ranks_present"] == [0, 1]
    assert [x["peak_bytes"] for x in data["ranks"]] == [p.peak for p in profs]
    assert json.loads((tmp_path / "merged.json").read_text()) == data
    page = Page((tmp_path / "merged.html").read_text())
    rows = page.find_all("tr")
    by_rank = {int(e.attrs["data-rank"]): e for e in rows if "data-rank" in e.attrs}
    assert sorted(by_rank) == [0, 1]                            # one row per rank
    for rank, p in enumerate(profs):
        cells = {e.attrs["data-category"]: int(e.attrs["data-bytes"])
                 for e in by_rank[rank].find_all("span") if "data-category" in e.attrs}
        assert cells == {k: v for k, v in p.breakdown("category").items()
                         if k in cells} and sum(cells.values()) == p.peak
    cards = [a for a in page.find_all("article") if a.attrs.get("data-kind", "").startswith(
        "retained")]
    assert len(cards) == 1 and cards[0].attrs["data-ranks"] == "0,1"
    assert "on ranks 0-1" in cards[0].all_text()
    lines = page.find_all("polyline")
    assert sorted(int(e.attrs["data-rank"]) for e in lines) == [0, 1]


def test_cli_refuses_mixed_jobs_in_one_line(two_ranks, cli):
    paths, _ = two_ranks
    code, _, err = cli(paths[0], paths[0])
    assert code == 2
    assert err.strip().count("\n") == 0 and "rank 0 given twice" in err
    code, _, err = cli(*paths, "--budget", "v100-16gb")
    assert code == 2 and "--budget" in err and err.strip().count("\n") == 0


def test_a_rank_that_raised_is_named_and_steps_are_finished_ones(tmp_path, cli):
    """The merged report showed a job whose rank 1 raised as if both ranks had finished,
    and counted the partial step after rank 0's last optimizer step."""
    paths = []
    for rank in (0, 1):
        p = _rank_run(rank, leak=None)
        if rank == 1:
            p.meta["error"] = "RuntimeError: boom on rank 1"
        path = str(tmp_path / f"run.rank{rank}.memprof")
        p.save(path)
        paths.append(path)
    profs = [memprof.load(p) for p in paths]
    merged = merge_ranks(profs, sources=paths)
    assert [r.error for r in merged.ranks] == [None, "RuntimeError: boom on rank 1"]
    assert [r.steps for r in merged.ranks] == [4, 4]
    assert [r.steps for r in merged.ranks] == [len(p.steps) - p.partial_last_step
                                               for p in profs]
    code, out, _ = cli(*paths)
    assert code == 0 and "rank 1's tracked code raised: RuntimeError: boom on rank 1" in " ".join(
        out.split())
    code, out, _ = cli(*paths, "--json")
    assert json.loads(out)["errors"] == {"1": "RuntimeError: boom on rank 1"}
    html = str(tmp_path / "m.html")
    cli(*paths, "--export", html)
    assert "boom on rank 1" in Page(open(html).read()).find_all("header")[0].all_text()


def test_a_ranks_file_exported_after_the_job_goes_where_it_is_told(tmp_path, monkeypatch):
    """`memprof report run.rank0.memprof --export r.html` wrote r.rank0.html (the per-rank
    name is for exports inside the job, where every rank writes one name)."""
    monkeypatch.delenv("RANK", raising=False)
    prof = _rank_run(1, leak=None)
    assert prof.meta["rank"] == 1 and prof.meta["world_size"] == 2
    prof.meta["pid"] = -1                                  # a file of another process
    written = memprof.export(prof, str(tmp_path / "r.html"))
    assert written == str(tmp_path / "r.html") and (tmp_path / "r.html").exists()
    prof.meta["pid"] = os.getpid()                         # recorded here: the rank's name
    assert memprof.export(prof, str(tmp_path / "r.html")).endswith("r.rank1.html")
